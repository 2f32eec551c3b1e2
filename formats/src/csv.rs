//! `csv`: one RFC 4180 line per message, the payload columns in declared order.
//!
//! Quoted fields may hold the delimiter, doubled quotes and line breaks. A trailing line break
//! is accepted when reading and never written. Nulls: an empty unquoted field is null and an
//! empty string is written quoted (`""`); with `csv.null-literal` set, that literal (unquoted)
//! is null, a value equal to it is written quoted, and an empty unquoted field is an empty
//! STRING or BYTES value (and null in any other column).

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::error::FieldError;
use crate::options::{CsvOptions, PayloadField, TimestampStandard};
use crate::schema::DataType;
use crate::value::Value;

struct Field<'a> {
    text: Cow<'a, str>,
    quoted: bool,
}

/// Splits one record into fields.
fn split<'a>(line: &'a str, opts: &CsvOptions) -> Result<Vec<Field<'a>>, String> {
    let line = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(line);
    let bytes = line.as_bytes();
    let delim = opts.field_delimiter;
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        if opts.quote_character.is_some() && bytes.get(pos).copied() == opts.quote_character {
            let quote = bytes[pos];
            let mut text = String::new();
            let mut start = pos + 1;
            let mut i = start;
            loop {
                match bytes.get(i) {
                    None => return Err(format!("field {} has an unterminated quote", fields.len() + 1)),
                    Some(&b) if b == quote => {
                        text.push_str(&line[start..i]);
                        if bytes.get(i + 1) == Some(&quote) {
                            text.push(char::from(quote));
                            i += 2;
                            start = i;
                        } else {
                            i += 1;
                            break;
                        }
                    }
                    Some(_) => i += 1,
                }
            }
            fields.push(Field { text: Cow::Owned(text), quoted: true });
            pos = i;
            match bytes.get(pos) {
                None => break,
                Some(&b) if b == delim => pos += 1,
                Some(_) => return Err(format!("field {} has text after its closing quote", fields.len())),
            }
        } else {
            let end = bytes[pos..].iter().position(|&b| b == delim).map_or(bytes.len(), |p| pos + p);
            fields.push(Field { text: Cow::Borrowed(&line[pos..end]), quoted: false });
            if end == bytes.len() {
                break;
            }
            pos = end + 1;
        }
    }
    Ok(fields)
}

pub(crate) fn decode(
    bytes: &[u8],
    fields: &[PayloadField],
    opts: &CsvOptions,
    row: &mut [Value],
) -> Result<(), String> {
    let line = std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8: {e}"))?;
    let parts = split(line, opts)?;
    if parts.len() != fields.len() {
        return Err(format!(
            "expected {} fields ({}), found {}",
            fields.len(),
            fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
            parts.len()
        ));
    }
    for (f, part) in fields.iter().zip(parts) {
        let value =
            from_text(&part, f.data_type, opts).map_err(|reason| format!("field '{}': {reason}", f.name))?;
        if let Some(slot) = row.get_mut(f.index) {
            *slot = value;
        }
    }
    Ok(())
}

fn shown(text: &str) -> String {
    let mut s = text.to_string();
    if s.len() > 64 {
        let mut cut = 61;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    format!("{s:?}")
}

fn from_text(field: &Field<'_>, ty: DataType, opts: &CsvOptions) -> Result<Value, String> {
    let text = field.text.as_ref();
    if !field.quoted {
        if opts.null_literal.as_deref() == Some(text) {
            return Ok(Value::Null);
        }
        let textual = matches!(ty, DataType::String | DataType::Bytes);
        if text.is_empty() && (!textual || opts.null_literal.is_none()) {
            return Ok(Value::Null);
        }
    }
    let mismatch = || format!("expected {ty}, found {}", shown(text));
    let value = match ty {
        DataType::String => Value::String(text.to_string()),
        DataType::Boolean => match text.trim().to_ascii_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(mismatch()),
        },
        DataType::Int | DataType::BigInt => {
            let n = text.trim().parse::<i64>().map_err(|_| mismatch())?;
            if ty == DataType::Int && i32::try_from(n).is_err() {
                return Err(format!("{n} is out of range for INT"));
            }
            Value::Int(n)
        }
        DataType::Double => Value::Double(text.trim().parse::<f64>().map_err(|_| mismatch())?),
        DataType::Timestamp => {
            let t = text.trim();
            let ms = if !t.is_empty()
                && t.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
            {
                t.parse::<i64>().ok()
            } else {
                crate::time::parse(t)
            };
            Value::Timestamp(ms.ok_or_else(|| {
                format!("expected TIMESTAMP like 2024-05-01 12:00:00.000, found {}", shown(text))
            })?)
        }
        DataType::Bytes => Value::Bytes(
            crate::base64::decode(text.trim())
                .ok_or_else(|| format!("expected BYTES as base64, found {}", shown(text)))?,
        ),
        DataType::Map => crate::json::parse_map(text)?,
    };
    Ok(value)
}

pub(crate) fn encode(
    row: &[Value],
    fields: &[PayloadField],
    opts: &CsvOptions,
    out: &mut Vec<u8>,
) -> Result<(), FieldError> {
    let mut text = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(opts.field_delimiter);
        }
        let value = row.get(f.index).unwrap_or(&Value::Null);
        text.clear();
        match (f.data_type, value) {
            (_, Value::Null) => {
                if let Some(null) = &opts.null_literal {
                    out.extend_from_slice(null.as_bytes());
                }
                continue;
            }
            (DataType::String, Value::String(s)) => {
                text.push_str(s);
            }
            (DataType::Boolean, Value::Bool(b)) => {
                text.push_str(if *b { "true" } else { "false" });
            }
            (DataType::Int | DataType::BigInt, Value::Int(n)) => {
                let _ = write!(text, "{n}");
            }
            (DataType::Double, Value::Double(d)) => {
                if d.is_finite() {
                    crate::json::write_f64(*d, &mut text);
                } else {
                    text.push_str(crate::json::non_finite(*d));
                }
            }
            (DataType::Double, Value::Int(n)) => {
                crate::json::write_f64(*n as f64, &mut text);
            }
            (DataType::Timestamp, Value::Timestamp(ms)) => {
                crate::time::format(*ms, TimestampStandard::Sql, &mut text);
            }
            (DataType::Bytes, Value::Bytes(b)) => {
                crate::base64::encode(b, &mut text);
            }
            (DataType::Map, Value::Map(entries)) => {
                let mut json = Vec::new();
                crate::json::write_map(entries, &mut json);
                text.push_str(&String::from_utf8_lossy(&json));
            }
            _ => {
                return Err(FieldError::new(
                    &f.name,
                    format!("a {} value in a {} column", value.kind(), f.data_type),
                ))
            }
        };
        // An empty value must not read back as null, nor a value equal to the null literal.
        // (Without quoting, an empty field is an empty value only when a null literal is set.)
        let quote_empty = opts.null_literal.is_none() || opts.quote_character.is_some();
        let must_quote =
            (text.is_empty() && quote_empty) || opts.null_literal.as_deref() == Some(text.as_str());
        write_field(&text, must_quote, opts, out).map_err(|reason| FieldError::new(&f.name, reason))?;
    }
    Ok(())
}

fn write_field(text: &str, must_quote: bool, opts: &CsvOptions, out: &mut Vec<u8>) -> Result<(), String> {
    let special =
        |b: u8| b == opts.field_delimiter || b == b'\n' || b == b'\r' || Some(b) == opts.quote_character;
    let needs = must_quote || text.bytes().any(special);
    match opts.quote_character {
        Some(q) if needs => {
            out.push(q);
            for &b in text.as_bytes() {
                if b == q {
                    out.push(q);
                }
                out.push(b);
            }
            out.push(q);
        }
        None if needs => {
            if text.is_empty() {
                return Err(
                    "an empty string cannot be told from null with csv.disable-quote-character and no \
                            csv.null-literal"
                        .into(),
                );
            }
            if text.bytes().any(special) {
                return Err(format!(
                    "{} holds the field delimiter or a line break, and csv.disable-quote-character is set",
                    shown(text)
                ));
            }
            return Err(format!("{} equals csv.null-literal and cannot be quoted", shown(text)));
        }
        _ => out.extend_from_slice(text.as_bytes()),
    }
    Ok(())
}
