//! `csv`: one RFC 4180 line per message, the payload columns in declared order.
//!
//! Quoted fields may hold the delimiter, doubled quotes and line breaks. A trailing line break
//! is accepted when reading and never written. Nulls: an empty unquoted field is null and an
//! empty string is written quoted (`""`); with `csv.null-literal` set, that literal (unquoted)
//! is null, a value equal to it is written quoted, and an empty unquoted field is an empty
//! STRING or BYTES value (and null in any other column).
//!
//! A ROW column is only written (the `print` and `file` sinks' lines): as its JSON object, one
//! field. Kafka sources and sinks refuse ROW columns in csv when their format is checked.
//!
//! Both directions work without allocating per message: a line is split into field spans
//! kept in a reused [`CsvScratch`] (only a quoted field with doubled quotes is copied, into a
//! reused buffer), values are staged into [`Staged`], and encoding appends to the caller's
//! buffers.

use std::ops::Range;

use crate::batch::{ColRef, Slot, Staged};
use crate::error::FieldError;
use crate::options::{CsvOptions, PayloadField, TimestampStandard};
use crate::schema::DataType;
use crate::text;

/// Where one field's text is.
#[derive(Debug, Clone)]
struct Span {
    range: Range<usize>,
    /// In [`CsvScratch::unquoted`] (a quoted field with doubled quotes) rather than the line.
    copied: bool,
    quoted: bool,
}

/// Reused between messages by one decoder.
#[derive(Debug, Clone, Default)]
pub(crate) struct CsvScratch {
    spans: Vec<Span>,
    unquoted: String,
}

impl CsvScratch {
    fn field<'a>(&'a self, line: &'a str, span: &Span) -> &'a str {
        let source = if span.copied { self.unquoted.as_str() } else { line };
        source.get(span.range.clone()).unwrap_or_default()
    }
}

/// Splits one record (its line break already removed) into field spans.
fn split(line: &str, opts: &CsvOptions, scratch: &mut CsvScratch) -> Result<(), String> {
    scratch.spans.clear();
    scratch.unquoted.clear();
    let bytes = line.as_bytes();
    let delim = opts.field_delimiter;
    let mut pos = 0;
    loop {
        if opts.quote_character.is_some() && bytes.get(pos).copied() == opts.quote_character {
            let quote = bytes[pos];
            let start = pos + 1;
            let mut i = start;
            // Doubled quotes: the field is copied without them.
            let mut copy_from: Option<usize> = None;
            let mut seg = start;
            loop {
                match bytes.get(i) {
                    None => {
                        return Err(format!("field {} has an unterminated quote", scratch.spans.len() + 1))
                    }
                    Some(&b) if b == quote => {
                        if bytes.get(i + 1) == Some(&quote) {
                            if copy_from.is_none() {
                                copy_from = Some(scratch.unquoted.len());
                            }
                            scratch.unquoted.push_str(line.get(seg..=i).unwrap_or_default());
                            i += 2;
                            seg = i;
                        } else {
                            break;
                        }
                    }
                    Some(_) => i += 1,
                }
            }
            let span = match copy_from {
                Some(from) => {
                    scratch.unquoted.push_str(line.get(seg..i).unwrap_or_default());
                    Span { range: from..scratch.unquoted.len(), copied: true, quoted: true }
                }
                None => Span { range: start..i, copied: false, quoted: true },
            };
            scratch.spans.push(span);
            pos = i + 1;
            match bytes.get(pos) {
                None => break,
                Some(&b) if b == delim => pos += 1,
                Some(_) => {
                    return Err(format!("field {} has text after its closing quote", scratch.spans.len()))
                }
            }
        } else {
            let end = bytes[pos..].iter().position(|&b| b == delim).map_or(bytes.len(), |p| pos + p);
            scratch.spans.push(Span { range: pos..end, copied: false, quoted: false });
            if end == bytes.len() {
                break;
            }
            pos = end + 1;
        }
    }
    Ok(())
}

pub(crate) fn decode(
    bytes: &[u8],
    fields: &[PayloadField],
    opts: &CsvOptions,
    scratch: &mut CsvScratch,
    staged: &mut Staged,
) -> Result<(), String> {
    let line = std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8: {e}"))?;
    let line = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(line);
    split(line, opts, scratch)?;
    if scratch.spans.len() != fields.len() {
        return Err(format!(
            "expected {} fields ({}), found {}",
            fields.len(),
            fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
            scratch.spans.len()
        ));
    }
    for (f, span) in fields.iter().zip(&scratch.spans) {
        let text = scratch.field(line, span);
        let slot = from_text(text, span.quoted, &f.data_type, opts, staged)
            .map_err(|reason| format!("field '{}': {reason}", f.name))?;
        staged.set(f.index, slot);
    }
    Ok(())
}

fn from_text(
    text: &str,
    quoted: bool,
    ty: &DataType,
    opts: &CsvOptions,
    staged: &mut Staged,
) -> Result<Slot, String> {
    if !quoted {
        if opts.null_literal.as_deref() == Some(text) {
            return Ok(Slot::Null);
        }
        let textual = matches!(ty, DataType::String | DataType::Bytes);
        if text.is_empty() && (!textual || opts.null_literal.is_none()) {
            return Ok(Slot::Null);
        }
    }
    let mismatch = || format!("expected {ty}, found {}", text::shown(text));
    let slot = match ty {
        DataType::String => staged.push_text(text),
        DataType::Boolean => {
            let t = text.trim();
            if t.eq_ignore_ascii_case("true") {
                Slot::Bool(true)
            } else if t.eq_ignore_ascii_case("false") {
                Slot::Bool(false)
            } else {
                return Err(mismatch());
            }
        }
        DataType::Int | DataType::BigInt => {
            let n = text.trim().parse::<i64>().map_err(|_| mismatch())?;
            text::check_int(ty, n)?;
            Slot::Int(n)
        }
        DataType::Double => Slot::Double(text.trim().parse::<f64>().map_err(|_| mismatch())?),
        DataType::Timestamp => {
            let t = text.trim();
            let ms = if !t.is_empty()
                && t.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
            {
                t.parse::<i64>().ok()
            } else {
                crate::time::parse(t)
            };
            Slot::Timestamp(ms.ok_or_else(|| {
                format!("expected TIMESTAMP like 2024-05-01 12:00:00.000, found {}", text::shown(text))
            })?)
        }
        DataType::Bytes => text::stage_base64(text.trim(), staged)
            .ok_or_else(|| format!("expected BYTES as base64, found {}", text::shown(text)))?,
        DataType::Map => crate::json::stage_map(text, staged)?,
        DataType::Date => Slot::Date(
            crate::time::parse_date(text)
                .ok_or_else(|| format!("expected DATE like 2024-05-01, found {}", text::shown(text)))?,
        ),
        DataType::Decimal { precision, scale } => {
            Slot::Decimal(text::parse_decimal(text, *precision, *scale)?)
        }
        // Refused when the format is checked against the schema (RecordFormat::from_options).
        DataType::Row(_) => return Err(format!("{ty} columns need the json format")),
    };
    Ok(slot)
}

/// Appends row `row`'s payload columns as one line (no line break).
pub(crate) fn encode(
    cols: &[ColRef<'_>],
    row: usize,
    fields: &[PayloadField],
    opts: &CsvOptions,
    scratch: &mut String,
    out: &mut Vec<u8>,
) -> Result<(), FieldError> {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(opts.field_delimiter);
        }
        let Some(col) = cols.get(f.index) else {
            return Err(FieldError::new(&f.name, "the batch has no such column"));
        };
        if col.is_null(row) {
            if let Some(null) = &opts.null_literal {
                out.extend_from_slice(null.as_bytes());
            }
            continue;
        }
        scratch.clear();
        let text: &str = match (&f.data_type, col) {
            (DataType::String, ColRef::String(a)) => a.value(row),
            (DataType::Boolean, ColRef::Boolean(a)) => {
                if a.value(row) {
                    "true"
                } else {
                    "false"
                }
            }
            (DataType::Int | DataType::BigInt, c @ (ColRef::Int(_) | ColRef::BigInt(_))) => {
                text::push_int(c.int(row).unwrap_or_default(), scratch);
                scratch
            }
            (DataType::Double, ColRef::Double(a)) => {
                text::push_double(a.value(row), scratch);
                scratch
            }
            (DataType::Double, c @ (ColRef::Int(_) | ColRef::BigInt(_))) => {
                text::push_double(c.int(row).unwrap_or_default() as f64, scratch);
                scratch
            }
            (DataType::Timestamp, ColRef::Timestamp(a)) => {
                crate::time::format(a.value(row), TimestampStandard::Sql, scratch);
                scratch
            }
            (DataType::Bytes, ColRef::Bytes(a)) => {
                text::push_base64(a.value(row), scratch);
                scratch
            }
            (DataType::Date, ColRef::Date(a)) => {
                crate::time::format_date(a.value(row), scratch);
                scratch
            }
            (DataType::Decimal { precision, scale }, ColRef::Decimal(a)) => {
                let unscaled =
                    text::decimal_at(a, row, *precision, *scale).map_err(|r| FieldError::new(&f.name, r))?;
                text::push_decimal(unscaled, *scale, scratch);
                scratch
            }
            (DataType::Row(_), c @ ColRef::Row(_)) => {
                // The row's JSON object, built at the end of `out` and moved to `scratch`.
                let start = out.len();
                crate::json::write_nested(&f.data_type, c, row, scratch, out).map_err(|(path, reason)| {
                    let column = if path.is_empty() { f.name.clone() } else { format!("{}.{path}", f.name) };
                    FieldError { column, reason }
                })?;
                scratch.clear();
                scratch
                    .push_str(out.get(start..).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default());
                out.truncate(start);
                scratch
            }
            (DataType::Map, c @ ColRef::Map(_)) => {
                let mut json = Vec::new();
                crate::json::write_map(c, row, &mut json);
                scratch.push_str(&String::from_utf8_lossy(&json));
                scratch
            }
            _ => return Err(text::type_error(f, col)),
        };
        // An empty value must not read back as null, nor a value equal to the null literal.
        // (Without quoting, an empty field is an empty value only when a null literal is set.)
        let quote_empty = opts.null_literal.is_none() || opts.quote_character.is_some();
        let must_quote = (text.is_empty() && quote_empty) || opts.null_literal.as_deref() == Some(text);
        write_field(text, must_quote, opts, out).map_err(|reason| FieldError::new(&f.name, reason))?;
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
                    text::shown(text)
                ));
            }
            return Err(format!("{} equals csv.null-literal and cannot be quoted", text::shown(text)));
        }
        _ => out.extend_from_slice(text.as_bytes()),
    }
    Ok(())
}
