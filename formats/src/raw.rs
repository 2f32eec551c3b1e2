//! `raw`: the whole key or value is the one STRING (UTF-8) or BYTES column; an absent payload
//! (a null key, a tombstone) is a null.

use crate::error::FieldError;
use crate::options::PayloadField;
use crate::schema::DataType;
use crate::value::Value;

pub(crate) fn decode(bytes: Option<&[u8]>, fields: &[PayloadField], row: &mut [Value]) -> Result<(), String> {
    let Some(f) = fields.first() else { return Ok(()) };
    let value = match bytes {
        None => Value::Null,
        Some(b) if f.data_type == DataType::String => {
            Value::String(std::str::from_utf8(b).map_err(|e| format!("not valid UTF-8: {e}"))?.to_string())
        }
        Some(b) => Value::Bytes(b.to_vec()),
    };
    if let Some(slot) = row.get_mut(f.index) {
        *slot = value;
    }
    Ok(())
}

/// `None` for a null value.
pub(crate) fn encode(row: &[Value], fields: &[PayloadField]) -> Result<Option<Vec<u8>>, FieldError> {
    let Some(f) = fields.first() else { return Ok(None) };
    match row.get(f.index).unwrap_or(&Value::Null) {
        Value::Null => Ok(None),
        Value::String(s) if f.data_type == DataType::String => Ok(Some(s.as_bytes().to_vec())),
        Value::Bytes(b) if f.data_type == DataType::Bytes => Ok(Some(b.clone())),
        other => {
            Err(FieldError::new(&f.name, format!("a {} value in a {} column", other.kind(), f.data_type)))
        }
    }
}
