//! Per-record errors. Configuration errors are `KeelError::InvalidSpec` and are built where the
//! configuration is read.

use std::fmt;

use keel_proto::KeelError;

use crate::options::FormatKind;

/// The part of a Kafka message a format reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Key,
    Value,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Key => "key",
            Part::Value => "value",
        })
    }
}

/// A message that does not parse as its declared format, with `ignore-parse-errors` off for the
/// part that failed. The message names where the record is and why it failed:
///
/// `malformed record at topic 'people' partition 3 offset 1042: value (json): field 'age':
/// expected INT, found "x"`.
///
/// Converted into [`KeelError::FailedPrecondition`] with that message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed record at topic '{topic}' partition {partition} offset {offset}: {part} ({format}): {reason}"
)]
pub struct DecodeError {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub part: Part,
    pub format: FormatKind,
    pub reason: String,
}

impl From<DecodeError> for KeelError {
    fn from(err: DecodeError) -> Self {
        KeelError::FailedPrecondition { reason: err.to_string() }
    }
}

/// A row that cannot be written: a value whose type does not match its column, or text the
/// format cannot carry (a delimiter in a CSV field with quoting disabled). Rows built by a
/// [`crate::RecordDecoder`] or a [`crate::Projection`] checked against the sink's schema do not
/// hit this; a hand-built row can.
///
/// `part` is `None` for the record's metadata (timestamp, headers) and for a row of the wrong
/// width. Converted into [`KeelError::InvalidArgument`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct EncodeError {
    pub column: String,
    pub part: Option<(Part, FormatKind)>,
    pub reason: String,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.part {
            Some((part, format)) => {
                write!(
                    f,
                    "cannot encode column '{}' into the {part} ({format}): {}",
                    self.column, self.reason
                )
            }
            None => write!(f, "cannot encode column '{}': {}", self.column, self.reason),
        }
    }
}

impl From<EncodeError> for KeelError {
    fn from(err: EncodeError) -> Self {
        KeelError::InvalidArgument { reason: err.to_string() }
    }
}

/// An encoding failure inside a format, before the part and format are known.
#[derive(Debug)]
pub(crate) struct FieldError {
    pub column: String,
    pub reason: String,
}

impl FieldError {
    pub(crate) fn new(column: &str, reason: impl Into<String>) -> FieldError {
        FieldError { column: column.to_string(), reason: reason.into() }
    }
}
