//! `raw`: the whole key or value is the one STRING (UTF-8) or BYTES column; an absent payload
//! (a null key, a tombstone) is a null.

use crate::batch::{ColRef, Slot, Staged};
use crate::error::FieldError;
use crate::options::PayloadField;
use crate::schema::DataType;

pub(crate) fn decode(
    bytes: Option<&[u8]>,
    fields: &[PayloadField],
    staged: &mut Staged,
) -> Result<(), String> {
    let Some(f) = fields.first() else { return Ok(()) };
    let slot = match bytes {
        None => Slot::Null,
        Some(b) if f.data_type == DataType::String => {
            staged.push_text(std::str::from_utf8(b).map_err(|e| format!("not valid UTF-8: {e}"))?)
        }
        Some(b) => staged.push_bytes(b),
    };
    staged.set(f.index, slot);
    Ok(())
}

/// Appends row `row`'s column to `out`; `false` (nothing appended) for a null.
pub(crate) fn encode(
    cols: &[ColRef<'_>],
    row: usize,
    fields: &[PayloadField],
    out: &mut Vec<u8>,
) -> Result<bool, FieldError> {
    let Some(f) = fields.first() else { return Ok(false) };
    let Some(col) = cols.get(f.index) else {
        return Err(FieldError::new(&f.name, "the batch has no such column"));
    };
    if col.is_null(row) {
        return Ok(false);
    }
    match (&f.data_type, col) {
        (DataType::String, ColRef::String(a)) => out.extend_from_slice(a.value(row).as_bytes()),
        (DataType::Bytes, ColRef::Bytes(a)) => out.extend_from_slice(a.value(row)),
        _ => return Err(crate::text::type_error(f, col)),
    }
    Ok(true)
}
