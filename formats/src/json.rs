//! `json`: one JSON object per message, one field per payload column.
//!
//! Decoding reads the object in one pass with serde_json, borrowing each declared field's JSON
//! text ([`RawValue`]) from the message instead of building values; undeclared fields are
//! skipped without being built. A ROW column's object is walked in the same pass, its declared
//! fields located the same way (undeclared ones skipped). Once the whole object parsed, the
//! declared fields are converted in declared order straight into the staged row, a ROW's
//! fields into consecutive slots after it (missing ones null unless
//! `json.fail-on-missing-field`; a JSON `null` is a null row); an error inside a row names the
//! field's path (`field 'properties.owner': ...`). Strings without escapes, numbers, booleans
//! and rows cost no allocation; a string with escapes, a non-string JSON value read into a
//! STRING column, MAP values and undeclared values nested two levels deep do.
//!
//! Encoding writes each column as its JSON form, a ROW as a nested object of its fields in
//! declared order (`json.encode.ignore-null-fields` leaves out null fields inside rows too).

use std::fmt;
use std::io::Write as _;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value as Json;

use crate::batch::{ColRef, Slot, Staged};
use crate::error::FieldError;
use crate::options::{JsonOptions, PayloadField};
use crate::schema::{DataType, RowField};
use crate::text;

/// Reused between messages by one decoder: what was found for each declared field, the
/// payload's first, then each ROW object's fields in a block of their own.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonScratch {
    found: Vec<Option<Found>>,
}

/// What the message holds for one declared field.
#[derive(Debug, Clone)]
enum Found {
    /// The value's JSON text: a range of the message.
    Raw(Range<usize>),
    /// A ROW field's object: its declared fields start at this index of
    /// [`JsonScratch::found`].
    Row(usize),
    /// `null` for a ROW field.
    Null,
    /// Anything else for a ROW field, shown for the error message.
    NotObject(String),
}

/// Why a field did not decode.
#[derive(Debug)]
struct Fail {
    /// The path of the ROW field it happened in, below the column (empty at the column itself;
    /// `owner`, `address.city`).
    path: String,
    /// `None`: the field is missing and `json.fail-on-missing-field` is set.
    reason: Option<String>,
}

impl From<String> for Fail {
    fn from(reason: String) -> Fail {
        Fail { path: String::new(), reason: Some(reason) }
    }
}

impl Fail {
    fn missing(name: &str) -> Fail {
        Fail { path: name.to_string(), reason: None }
    }

    /// The same failure seen from the ROW around field `name`.
    fn inside(mut self, name: &str) -> Fail {
        self.path = if self.path.is_empty() { name.to_string() } else { format!("{name}.{}", self.path) };
        self
    }

    /// The message for a failure in column `column`.
    fn message(&self, column: &str) -> String {
        let path = if self.path.is_empty() { column.to_string() } else { format!("{column}.{}", self.path) };
        match &self.reason {
            Some(reason) => format!("field '{path}': {reason}"),
            None => format!("field '{path}' is missing (json.fail-on-missing-field is true)"),
        }
    }
}

/// Parses `bytes` as an object and stages each payload column's value. A field given twice
/// takes its last value.
pub(crate) fn decode(
    bytes: &[u8],
    fields: &[PayloadField],
    opts: &JsonOptions,
    scratch: &mut JsonScratch,
    staged: &mut Staged,
) -> Result<(), String> {
    scratch.found.clear();
    scratch.found.resize(fields.len(), None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let visitor = ObjectVisitor {
        names: Names::Payload(fields),
        base: bytes.as_ptr() as usize,
        found: &mut scratch.found,
        block: 0,
    };
    let parsed = de::Deserializer::deserialize_any(&mut de, visitor).and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(match e.classify() {
            serde_json::error::Category::Data => e.to_string(),
            _ => format!("not valid JSON: {e}"),
        });
    }
    for (i, f) in fields.iter().enumerate() {
        let found = match scratch.found.get_mut(i).and_then(Option::take) {
            None if opts.fail_on_missing_field => return Err(Fail::missing("").message(&f.name)),
            None => continue,
            Some(found) => found,
        };
        let slot =
            stage(found, &f.data_type, bytes, opts, scratch, staged).map_err(|e| e.message(&f.name))?;
        staged.set(f.index, slot);
    }
    Ok(())
}

/// Stages what was found for a field of type `ty`.
fn stage(
    found: Found,
    ty: &DataType,
    bytes: &[u8],
    opts: &JsonOptions,
    scratch: &mut JsonScratch,
    staged: &mut Staged,
) -> Result<Slot, Fail> {
    match (found, ty) {
        (Found::Raw(r), _) => {
            let raw = bytes.get(r).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("null");
            from_json(raw, ty, staged)
        }
        (Found::Null, _) => Ok(Slot::Null),
        (Found::Row(block), DataType::Row(fields)) => {
            let range = staged.push_row(fields.len());
            for (i, f) in fields.iter().enumerate() {
                let slot = match scratch.found.get_mut(block + i).and_then(Option::take) {
                    None if opts.fail_on_missing_field => return Err(Fail::missing(&f.name)),
                    None => Slot::Null,
                    Some(found) => stage(found, &f.data_type, bytes, opts, scratch, staged)
                        .map_err(|e| e.inside(&f.name))?,
                };
                staged.set_child(range.start + i, slot);
            }
            Ok(Slot::Row(range))
        }
        (Found::Row(_), _) => Err(format!("expected {ty}, found an object").into()),
        (Found::NotObject(shown), _) => Err(format!("expected {ty}, found {shown}").into()),
    }
}

/// The declared fields an object is read for: a message's payload columns, or a ROW's fields.
#[derive(Clone, Copy)]
enum Names<'a> {
    Payload(&'a [PayloadField]),
    Row(&'a [RowField]),
}

impl<'a> Names<'a> {
    fn position(self, key: &str) -> Option<usize> {
        match self {
            Names::Payload(fields) => fields.iter().position(|f| f.name == key),
            Names::Row(fields) => fields.iter().position(|f| f.name == key),
        }
    }

    fn len(self) -> usize {
        match self {
            Names::Payload(fields) => fields.len(),
            Names::Row(fields) => fields.len(),
        }
    }

    /// The fields of field `i` when it is a ROW.
    fn row_fields(self, i: usize) -> Option<&'a [RowField]> {
        match self {
            Names::Payload(fields) => fields.get(i)?.data_type.row_fields(),
            Names::Row(fields) => fields.get(i)?.data_type.row_fields(),
        }
    }
}

/// Locates the declared fields of one object: their entries are `found[block..block + n]`.
struct ObjectVisitor<'a> {
    names: Names<'a>,
    /// Address of the message's first byte: borrowed JSON texts are located relative to it.
    base: usize,
    found: &'a mut Vec<Option<Found>>,
    block: usize,
}

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(field) = map.next_key_seed(KeySeed { names: self.names })? {
            let Some(i) = field else {
                map.next_value::<de::IgnoredAny>()?;
                continue;
            };
            let found = match self.names.row_fields(i) {
                Some(fields) => map.next_value_seed(RowSeed {
                    names: Names::Row(fields),
                    base: self.base,
                    found: &mut *self.found,
                })?,
                None => {
                    let raw: &'de RawValue = map.next_value()?;
                    let text = raw.get();
                    let start = (text.as_ptr() as usize).saturating_sub(self.base);
                    Found::Raw(start..start + text.len())
                }
            };
            if let Some(slot) = self.found.get_mut(self.block + i) {
                *slot = Some(found);
            }
        }
        Ok(())
    }
}

/// A ROW field's value: an object is walked for its declared fields (in a new block of
/// `found`); anything else is kept for the conversion to refuse (or, `null`, to read as null).
struct RowSeed<'a> {
    names: Names<'a>,
    base: usize,
    found: &'a mut Vec<Option<Found>>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Found;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or null")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Found, A::Error> {
        let block = self.found.len();
        self.found.resize(block + self.names.len(), None);
        ObjectVisitor { names: self.names, base: self.base, found: self.found, block }.visit_map(map)?;
        Ok(Found::Row(block))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Found, E> {
        Ok(Found::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Found, E> {
        Ok(Found::NotObject(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Found, E> {
        Ok(Found::NotObject(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Found, E> {
        Ok(Found::NotObject(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Found, E> {
        Ok(Found::NotObject(v.to_string()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Found, E> {
        Ok(Found::NotObject(text::cut(&Json::from(v).to_string())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Found::NotObject("an array".to_string()))
    }
}

/// A key: the index of the declared field it names, without building the key.
struct KeySeed<'a> {
    names: Names<'a>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.names.position(key))
    }
}

/// The JSON text as a short rendering for error messages (compact JSON, cut at 64 bytes).
fn shown(raw: &str) -> String {
    let compact =
        serde_json::from_str::<Json>(raw).map(|v| v.to_string()).unwrap_or_else(|_| raw.to_string());
    text::cut(&compact)
}

fn mismatch(ty: &DataType, raw: &str) -> String {
    format!("expected {ty}, found {}", shown(raw))
}

/// The content of a JSON string literal; `None` when `raw` is not a string.
fn string_of(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(std::borrow::Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(std::borrow::Cow::Owned)
}

fn is_number(raw: &str) -> bool {
    raw.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

/// Stages one field's JSON text as a value of `ty`.
fn from_json(raw: &str, ty: &DataType, staged: &mut Staged) -> Result<Slot, Fail> {
    if raw == "null" {
        return Ok(Slot::Null);
    }
    let slot = match ty {
        DataType::String => match string_of(raw) {
            Some(s) => staged.push_text(&s),
            // Any other JSON value is read as its (compact) JSON text.
            None => {
                let text = serde_json::from_str::<Json>(raw).map(|v| v.to_string()).unwrap_or_default();
                staged.push_text(&text)
            }
        },
        DataType::Boolean => match raw {
            "true" => Slot::Bool(true),
            "false" => Slot::Bool(false),
            _ => match string_of(raw) {
                Some(s) if s.eq_ignore_ascii_case("true") => Slot::Bool(true),
                Some(s) if s.eq_ignore_ascii_case("false") => Slot::Bool(false),
                _ => return Err(mismatch(ty, raw).into()),
            },
        },
        DataType::Int | DataType::BigInt => {
            let n = if is_number(raw) {
                raw.parse::<i64>().ok().or_else(|| {
                    raw.parse::<f64>().ok().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64)
                })
            } else {
                string_of(raw).and_then(|s| s.trim().parse::<i64>().ok())
            };
            let n = n.ok_or_else(|| mismatch(ty, raw))?;
            text::check_int(ty, n)?;
            Slot::Int(n)
        }
        DataType::Double => {
            let d = if is_number(raw) {
                // A number past f64's range is not a value (serde_json refuses it too).
                raw.parse::<f64>().ok().filter(|d| d.is_finite())
            } else {
                string_of(raw).and_then(|s| s.trim().parse::<f64>().ok())
            };
            Slot::Double(d.ok_or_else(|| mismatch(ty, raw))?)
        }
        DataType::Timestamp => {
            if is_number(raw) {
                Slot::Timestamp(raw.parse::<i64>().map_err(|_| mismatch(ty, raw))?)
            } else {
                let s = string_of(raw).ok_or_else(|| mismatch(ty, raw))?;
                Slot::Timestamp(crate::time::parse(&s).ok_or_else(|| {
                    format!("expected TIMESTAMP like \"2024-05-01 12:00:00.000\", found {}", shown(raw))
                })?)
            }
        }
        DataType::Bytes => {
            let s = string_of(raw).ok_or_else(|| mismatch(ty, raw))?;
            text::stage_base64(&s, staged)
                .ok_or_else(|| format!("expected BYTES as base64, found {}", shown(raw)))?
        }
        DataType::Map => {
            if raw.starts_with('[') {
                return Err("expected MAP<STRING, BYTES>, found an array".to_string().into());
            }
            if !raw.starts_with('{') {
                return Err(mismatch(ty, raw).into());
            }
            stage_entries(raw, staged)?
        }
        DataType::Date => {
            let days = string_of(raw).and_then(|s| crate::time::parse_date(&s));
            Slot::Date(
                days.ok_or_else(|| format!("expected DATE like \"2024-05-01\", found {}", shown(raw)))?,
            )
        }
        DataType::Decimal { precision, scale } => {
            // The number's own text, so no digit is lost to a double; or a string.
            let unscaled = if is_number(raw) {
                text::parse_decimal(raw, *precision, *scale)?
            } else {
                let s = string_of(raw).ok_or_else(|| mismatch(ty, raw))?;
                text::parse_decimal(&s, *precision, *scale)?
            };
            Slot::Decimal(unscaled)
        }
        // A ROW field's value is located as an object (or null) when the message is parsed.
        DataType::Row(_) => return Err(mismatch(ty, raw).into()),
    };
    Ok(slot)
}

/// Stages a MAP written as a JSON object of base64 strings (or nulls), in order, repeats kept.
fn stage_entries(raw: &str, staged: &mut Staged) -> Result<Slot, String> {
    let entries: Vec<(String, Json)> = {
        let mut de = serde_json::Deserializer::from_str(raw);
        let v = EntriesSeed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
        v.map_err(|e| format!("expected a MAP as a JSON object of base64 strings: {e}"))?
    };
    let start = staged.entries.len();
    for (k, v) in &entries {
        let failed = match v {
            Json::Null => {
                staged.push_entry(k, None);
                None
            }
            Json::String(s) => match text::base64_decode(s) {
                Some(bytes) => {
                    staged.push_entry(k, Some(&bytes));
                    None
                }
                None => Some(format!(
                    "entry '{k}': expected BYTES as base64, found {}",
                    text::cut(&v.to_string())
                )),
            },
            other => Some(format!(
                "entry '{k}': expected a base64 string, found {}",
                text::cut(&other.to_string())
            )),
        };
        if let Some(reason) = failed {
            staged.entries.truncate(start);
            return Err(reason);
        }
    }
    Ok(Slot::Map(start..staged.entries.len()))
}

/// Stages a MAP given as JSON text (a CSV field); the text `null` is a null MAP.
pub(crate) fn stage_map(text: &str, staged: &mut Staged) -> Result<Slot, String> {
    if text.trim() == "null" {
        return Ok(Slot::Null);
    }
    stage_entries(text, staged)
}

/// An object's entries in order (repeated keys kept).
struct EntriesSeed;

impl<'de> DeserializeSeed<'de> for EntriesSeed {
    type Value = Vec<(String, Json)>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed {
    type Value = Vec<(String, Json)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of base64 strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            out.push((k, map.next_value::<Json>()?));
        }
        Ok(out)
    }
}

/// Appends row `row`'s payload columns as one JSON object, in declared order.
pub(crate) fn encode(
    cols: &[ColRef<'_>],
    row: usize,
    fields: &[PayloadField],
    opts: &JsonOptions,
    scratch: &mut String,
    out: &mut Vec<u8>,
) -> Result<(), FieldError> {
    out.push(b'{');
    let mut first = true;
    for f in fields {
        let Some(col) = cols.get(f.index) else {
            return Err(FieldError::new(&f.name, "the batch has no such column"));
        };
        write_member(&f.name, &f.data_type, col, row, opts, scratch, out, &mut first)
            .map_err(|e| FieldError { column: e.path, reason: e.reason.unwrap_or_default() })?;
    }
    out.push(b'}');
    Ok(())
}

/// Appends `"name":value` of `col` at `row` to an object being written (a comma first unless
/// `first`), or nothing for a null with `json.encode.ignore-null-fields`. The payload's top
/// level and a ROW's object both write their members through here; an error's path starts at
/// `name`.
#[allow(clippy::too_many_arguments)] // the encoder's state, passed down as write_value takes it
fn write_member(
    name: &str,
    ty: &DataType,
    col: &ColRef<'_>,
    row: usize,
    opts: &JsonOptions,
    scratch: &mut String,
    out: &mut Vec<u8>,
    first: &mut bool,
) -> Result<(), Fail> {
    let null = col.is_null(row);
    if null && opts.encode_ignore_null_fields {
        return Ok(());
    }
    if !*first {
        out.push(b',');
    }
    *first = false;
    write_str(out, name);
    out.push(b':');
    if null {
        out.extend_from_slice(b"null");
        return Ok(());
    }
    write_value(ty, col, row, opts, scratch, out).map_err(|e| e.inside(name))
}

/// Appends the (non-null) ROW at `row` of `col`, a column of type `ty`, as a JSON object
/// (csv's text of a ROW); the error is the path of the field below the column, and why.
pub(crate) fn write_nested(
    ty: &DataType,
    col: &ColRef<'_>,
    row: usize,
    scratch: &mut String,
    out: &mut Vec<u8>,
) -> Result<(), (String, String)> {
    write_value(ty, col, row, &JsonOptions::default(), scratch, out)
        .map_err(|e| (e.path, e.reason.unwrap_or_default()))
}

/// Appends the (non-null) value at `row` of `col`, a column of type `ty`.
fn write_value(
    ty: &DataType,
    col: &ColRef<'_>,
    row: usize,
    opts: &JsonOptions,
    scratch: &mut String,
    out: &mut Vec<u8>,
) -> Result<(), Fail> {
    scratch.clear();
    match (ty, col) {
        (DataType::String, ColRef::String(a)) => write_str(out, a.value(row)),
        (DataType::Boolean, ColRef::Boolean(a)) => {
            out.extend_from_slice(if a.value(row) { b"true" } else { b"false" })
        }
        (DataType::Int | DataType::BigInt, c @ (ColRef::Int(_) | ColRef::BigInt(_))) => {
            text::push_int(c.int(row).unwrap_or_default(), scratch);
            out.extend_from_slice(scratch.as_bytes());
        }
        (DataType::Double, ColRef::Double(a)) => write_double(a.value(row), scratch, out),
        (DataType::Double, c @ (ColRef::Int(_) | ColRef::BigInt(_))) => {
            write_double(c.int(row).unwrap_or_default() as f64, scratch, out)
        }
        (DataType::Timestamp, ColRef::Timestamp(a)) => {
            crate::time::format(a.value(row), opts.timestamp_standard, scratch);
            write_str(out, scratch);
        }
        (DataType::Bytes, ColRef::Bytes(a)) => {
            text::push_base64(a.value(row), scratch);
            write_str(out, scratch);
        }
        (DataType::Map, c @ ColRef::Map(_)) => write_map(c, row, out),
        (DataType::Date, ColRef::Date(a)) => {
            crate::time::format_date(a.value(row), scratch);
            write_str(out, scratch);
        }
        (DataType::Decimal { precision, scale }, ColRef::Decimal(a)) => {
            let unscaled = text::decimal_at(a, row, *precision, *scale)?;
            text::push_decimal(unscaled, *scale, scratch);
            out.extend_from_slice(scratch.as_bytes());
        }
        (DataType::Row(fields), ColRef::Row(a)) => {
            out.push(b'{');
            let mut first = true;
            for (i, f) in fields.iter().enumerate() {
                let Some(child) = a.columns().get(i) else {
                    return Err(Fail::from("the ROW value has no such field".to_string()).inside(&f.name));
                };
                let child = ColRef::of(child.as_ref());
                write_member(&f.name, &f.data_type, &child, row, opts, scratch, out, &mut first)?;
            }
            out.push(b'}');
        }
        _ => return Err(format!("a {} value in a {ty} column", col.kind()).into()),
    }
    Ok(())
}

/// A finite double as a number, NaN and the infinities as the strings `"NaN"`, `"Infinity"`
/// and `"-Infinity"`.
fn write_double(d: f64, scratch: &mut String, out: &mut Vec<u8>) {
    text::push_double(d, scratch);
    if d.is_finite() {
        out.extend_from_slice(scratch.as_bytes());
    } else {
        write_str(out, scratch);
    }
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
            // Writing to a Vec cannot fail.
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The MAP at `row` of `col` as a JSON object of base64 strings (null for a null value).
pub(crate) fn write_map(col: &ColRef<'_>, row: usize, out: &mut Vec<u8>) {
    let mut entries = Vec::new();
    col.map_entries(row, &mut entries);
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
                text::push_base64(bytes, &mut text);
                write_str(out, &text);
            }
        }
    }
    out.push(b'}');
}
