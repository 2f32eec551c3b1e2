//! Kafka messages ⇄ rows.
//!
//! A [`RecordDecoder`] turns a message (key, value and the record's topic, partition, offset,
//! timestamp and headers) into a [`Row`] of its schema; a [`RecordEncoder`] turns a row into
//! the key, value, timestamp and headers to produce. Both are built once per subtask from a
//! checked [`Schema`] and [`RecordFormat`]; a decoder is not shared between threads (it counts
//! what it skips).
//!
//! Skipping: a message whose value (or key) does not parse is skipped and counted when the
//! format of the part that failed has `ignore-parse-errors` set, and is a [`DecodeError`]
//! otherwise. A tombstone (a message without a value) is skipped and counted apart when the
//! value format is json or csv, as Flink does; with raw it is a row whose value column is null.

use crate::error::{DecodeError, EncodeError, FieldError, Part};
use crate::options::{FormatKind, FormatOptions, PayloadField, RecordFormat};
use crate::schema::{DataType, MetadataKey, Schema};
use crate::value::{Headers, Row, Value};

/// One consumed Kafka message, borrowed from the client's buffers.
#[derive(Debug, Clone, Copy)]
pub struct KafkaMessage<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch; `None` when the record has no timestamp.
    pub timestamp: Option<i64>,
    /// Only read when the schema has a `headers` column; pass `&[]` when
    /// [`RecordDecoder::needs_headers`] is false.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

#[derive(Debug, Clone)]
struct SideCodec {
    format: FormatOptions,
    fields: Vec<PayloadField>,
    part: Part,
}

impl SideCodec {
    fn decode(&self, bytes: Option<&[u8]>, row: &mut [Value]) -> Result<(), String> {
        match &self.format {
            FormatOptions::Raw(_) => crate::raw::decode(bytes, &self.fields, row),
            // A null key leaves the key columns null; a null value never gets here.
            FormatOptions::Json(o) => bytes.map_or(Ok(()), |b| crate::json::decode(b, &self.fields, o, row)),
            FormatOptions::Csv(o) => bytes.map_or(Ok(()), |b| crate::csv::decode(b, &self.fields, o, row)),
        }
    }

    fn encode(&self, row: &[Value]) -> Result<Option<Vec<u8>>, EncodeError> {
        let wrap = |e: FieldError| EncodeError {
            column: e.column,
            part: Some((self.part, self.format.kind())),
            reason: e.reason,
        };
        match &self.format {
            FormatOptions::Raw(_) => crate::raw::encode(row, &self.fields).map_err(wrap),
            FormatOptions::Json(o) => {
                let mut out = Vec::with_capacity(16 * self.fields.len() + 2);
                crate::json::encode(row, &self.fields, o, &mut out).map_err(wrap)?;
                Ok(Some(out))
            }
            FormatOptions::Csv(o) => {
                let mut out = Vec::with_capacity(8 * self.fields.len());
                crate::csv::encode(row, &self.fields, o, &mut out).map_err(wrap)?;
                Ok(Some(out))
            }
        }
    }
}

fn codecs(schema: &Schema, format: &RecordFormat) -> (SideCodec, Option<SideCodec>) {
    let value =
        SideCodec { format: format.value.clone(), fields: format.value_payload(schema), part: Part::Value };
    let key = format.key.as_ref().map(|k| SideCodec {
        format: k.clone(),
        fields: format.key_payload(schema),
        part: Part::Key,
    });
    (value, key)
}

/// Kafka message → [`Row`].
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    width: usize,
    value: SideCodec,
    key: Option<SideCodec>,
    metadata: Vec<(usize, MetadataKey, DataType)>,
    skipped_malformed: u64,
    skipped_tombstones: u64,
    last_skipped: Option<DecodeError>,
}

impl RecordDecoder {
    /// `format` must have been checked against `schema` ([`RecordFormat::from_options`]).
    pub fn new(schema: &Schema, format: &RecordFormat) -> RecordDecoder {
        let (value, key) = codecs(schema, format);
        let metadata = schema
            .columns()
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.metadata.map(|k| (i, k, c.data_type)))
            .collect();
        RecordDecoder {
            width: schema.len(),
            value,
            key,
            metadata,
            skipped_malformed: 0,
            skipped_tombstones: 0,
            last_skipped: None,
        }
    }

    /// Whether the schema reads the headers (so the caller can avoid collecting them).
    pub fn needs_headers(&self) -> bool {
        self.metadata.iter().any(|(_, k, _)| *k == MetadataKey::Headers)
    }

    /// The row of `msg`; `Ok(None)` when the message is skipped (malformed with
    /// `ignore-parse-errors` on, or a tombstone; both counted); `Err` when it is malformed and
    /// the failing part's format has `ignore-parse-errors` off.
    pub fn decode(&mut self, msg: &KafkaMessage<'_>) -> Result<Option<Row>, DecodeError> {
        if msg.value.is_none() && self.value.format.kind() != FormatKind::Raw {
            self.skipped_tombstones += 1;
            return Ok(None);
        }
        let mut values = vec![Value::Null; self.width];
        if let Some(key) = &self.key {
            if let Err(reason) = key.decode(msg.key, &mut values) {
                let (ignore, part, format) = (key.format.ignore_parse_errors(), key.part, key.format.kind());
                return self.malformed(msg, ignore, part, format, reason);
            }
        }
        if let Err(reason) = self.value.decode(msg.value, &mut values) {
            let (ignore, format) = (self.value.format.ignore_parse_errors(), self.value.format.kind());
            return self.malformed(msg, ignore, Part::Value, format, reason);
        }
        for &(index, key, data_type) in &self.metadata {
            let v = match key {
                MetadataKey::Topic => Value::String(msg.topic.to_string()),
                MetadataKey::Partition => Value::Int(i64::from(msg.partition)),
                MetadataKey::Offset => Value::Int(msg.offset),
                MetadataKey::Timestamp => match (msg.timestamp, data_type) {
                    (None, _) => Value::Null,
                    (Some(ts), DataType::Timestamp) => Value::Timestamp(ts),
                    (Some(ts), _) => Value::Int(ts),
                },
                MetadataKey::Headers => Value::Map(
                    msg.headers.iter().map(|(k, v)| ((*k).to_string(), v.map(<[u8]>::to_vec))).collect(),
                ),
            };
            if let Some(slot) = values.get_mut(index) {
                *slot = v;
            }
        }
        Ok(Some(Row::new(values)))
    }

    fn malformed(
        &mut self,
        msg: &KafkaMessage<'_>,
        ignore: bool,
        part: Part,
        format: FormatKind,
        reason: String,
    ) -> Result<Option<Row>, DecodeError> {
        let err = DecodeError {
            topic: msg.topic.to_string(),
            partition: msg.partition,
            offset: msg.offset,
            part,
            format,
            reason,
        };
        if ignore {
            self.skipped_malformed += 1;
            self.last_skipped = Some(err);
            Ok(None)
        } else {
            Err(err)
        }
    }

    /// Malformed messages skipped so far (`ignore-parse-errors`).
    pub fn skipped_malformed(&self) -> u64 {
        self.skipped_malformed
    }

    /// Tombstones skipped so far (json and csv values).
    pub fn skipped_tombstones(&self) -> u64 {
        self.skipped_tombstones
    }

    /// Why the latest skipped malformed message was skipped, for an occasional log line.
    pub fn last_skipped(&self) -> Option<&DecodeError> {
        self.last_skipped.as_ref()
    }
}

/// What to produce for one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    /// `None` without `key.fields`, or for a raw key whose column is null.
    pub key: Option<Vec<u8>>,
    /// `None` only for a raw value whose column is null (a tombstone).
    pub value: Option<Vec<u8>>,
    /// From the `timestamp` metadata column; `None` lets the producer choose.
    pub timestamp: Option<i64>,
    /// From the `headers` metadata column.
    pub headers: Headers,
}

impl EncodedRecord {
    /// Key and value bytes, for `numBytesOut`.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// [`Row`] → Kafka message. Read-only metadata columns (topic, partition, offset) are ignored.
#[derive(Debug, Clone)]
pub struct RecordEncoder {
    width: usize,
    value: SideCodec,
    key: Option<SideCodec>,
    timestamp: Option<(usize, String)>,
    headers: Option<(usize, String)>,
}

impl RecordEncoder {
    /// `format` must have been checked against `schema` ([`RecordFormat::from_options`]).
    pub fn new(schema: &Schema, format: &RecordFormat) -> RecordEncoder {
        let (value, key) = codecs(schema, format);
        let find = |key: MetadataKey| {
            schema
                .columns()
                .iter()
                .position(|c| c.metadata == Some(key))
                .and_then(|i| schema.column(i).map(|c| (i, c.name.clone())))
        };
        RecordEncoder {
            width: schema.len(),
            value,
            key,
            timestamp: find(MetadataKey::Timestamp),
            headers: find(MetadataKey::Headers),
        }
    }

    pub fn encode(&self, row: &Row) -> Result<EncodedRecord, EncodeError> {
        if row.len() != self.width {
            return Err(EncodeError {
                column: "*".into(),
                part: None,
                reason: format!("the row has {} values but the schema has {} columns", row.len(), self.width),
            });
        }
        let values = row.values.as_slice();
        let key = match &self.key {
            Some(k) => k.encode(values)?,
            None => None,
        };
        let value = self.value.encode(values)?;
        let timestamp = match &self.timestamp {
            None => None,
            Some((i, name)) => match row.get(*i) {
                Value::Null => None,
                Value::Timestamp(ms) | Value::Int(ms) => Some(*ms),
                other => {
                    return Err(EncodeError {
                        column: name.clone(),
                        part: None,
                        reason: format!("the record timestamp must be a TIMESTAMP, got {}", other.kind()),
                    })
                }
            },
        };
        let headers = match &self.headers {
            None => Vec::new(),
            Some((i, name)) => match row.get(*i) {
                Value::Null => Vec::new(),
                Value::Map(h) => h.clone(),
                other => {
                    return Err(EncodeError {
                        column: name.clone(),
                        part: None,
                        reason: format!("the record headers must be a MAP, got {}", other.kind()),
                    })
                }
            },
        };
        Ok(EncodedRecord { key, value, timestamp, headers })
    }
}

#[cfg(test)]
mod tests;
