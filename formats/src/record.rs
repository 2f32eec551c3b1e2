//! Kafka messages ⇄ columnar batches.
//!
//! A [`RecordDecoder`] appends a message (key, value and the record's topic, partition,
//! offset, timestamp, timestamp type, headers and leader epoch) as one row of a
//! [`BatchBuilder`] of its schema; a [`RecordEncoder`] encodes a batch's rows into the keys and
//! values to produce ([`EncodedBatch`], one reused buffer) and hands each row out with its
//! timestamp and headers ([`OutRecord`]). Both are built once per subtask from a checked
//! [`Schema`] and [`RecordFormat`]; a decoder is not shared between threads (it counts what it
//! skips, and keeps the buffers it decodes into). Neither allocates per message once warm,
//! except for MAP payload values (json and csv) and the rare values listed in the json codec.
//!
//! Skipping: a message whose value (or key) does not parse is skipped and counted when the
//! format of the part that failed has `ignore-parse-errors` set, and is a [`DecodeError`]
//! otherwise. A tombstone (a message without a value) is skipped and counted apart when the
//! value format is json or csv, as Flink does; with raw it is a row whose value column is null.

use std::ops::Range;

use arrow_array::RecordBatch;

use crate::batch::{row_of, BatchBuilder, ColRef, Slot, Staged};
use crate::csv::CsvScratch;
use crate::error::{DecodeError, EncodeError, FieldError, Part};
use crate::json::JsonScratch;
use crate::options::{FormatKind, FormatOptions, PayloadField, RecordFormat};
use crate::schema::{DataType, MetadataKey, Schema};
use crate::value::{Headers, Row};

/// How a record's timestamp was set (Kafka's timestamp type), what a `timestamp-type` column
/// reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimestampType {
    /// The record has no timestamp.
    #[default]
    NoTimestampType,
    /// Set by the producer.
    CreateTime,
    /// Set by the broker when it appended the record (topic `message.timestamp.type`).
    LogAppendTime,
}

impl TimestampType {
    /// The name a `timestamp-type` column holds (Kafka's `TimestampType.name`, as in Flink).
    pub fn name(self) -> &'static str {
        match self {
            TimestampType::NoTimestampType => "NoTimestampType",
            TimestampType::CreateTime => "CreateTime",
            TimestampType::LogAppendTime => "LogAppendTime",
        }
    }
}

/// One consumed Kafka message, borrowed from the client's buffers.
#[derive(Debug, Clone, Copy)]
pub struct KafkaMessage<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch; `None` when the record has no timestamp.
    pub timestamp: Option<i64>,
    /// How the timestamp was set ([`TimestampType::NoTimestampType`] without one).
    pub timestamp_type: TimestampType,
    /// The partition leader's epoch when the record was written; `None` when unknown (an old
    /// message format, or a client that does not tell).
    pub leader_epoch: Option<i32>,
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

/// A decoder's reused buffers.
#[derive(Debug, Default)]
struct Scratch {
    staged: Staged,
    csv: CsvScratch,
    json: JsonScratch,
}

impl SideCodec {
    fn decode(&self, bytes: Option<&[u8]>, scratch: &mut Scratch) -> Result<(), String> {
        let Scratch { staged, csv, json } = scratch;
        match &self.format {
            FormatOptions::Raw(_) => crate::raw::decode(bytes, &self.fields, staged),
            // A null key leaves the key columns null; a null value never gets here.
            FormatOptions::Json(o) => {
                bytes.map_or(Ok(()), |b| crate::json::decode(b, &self.fields, o, json, staged))
            }
            FormatOptions::Csv(o) => {
                bytes.map_or(Ok(()), |b| crate::csv::decode(b, &self.fields, o, csv, staged))
            }
        }
    }

    /// Appends row `row`'s payload to `out`; `false` (nothing appended) for a null raw payload.
    fn encode(
        &self,
        cols: &[ColRef<'_>],
        row: usize,
        text: &mut String,
        out: &mut Vec<u8>,
    ) -> Result<bool, EncodeError> {
        let wrap = |e: FieldError| EncodeError {
            column: e.column,
            part: Some((self.part, self.format.kind())),
            reason: e.reason,
        };
        match &self.format {
            FormatOptions::Raw(_) => crate::raw::encode(cols, row, &self.fields, out).map_err(wrap),
            FormatOptions::Json(o) => {
                crate::json::encode(cols, row, &self.fields, o, text, out).map_err(wrap)?;
                Ok(true)
            }
            FormatOptions::Csv(o) => {
                crate::csv::encode(cols, row, &self.fields, o, text, out).map_err(wrap)?;
                Ok(true)
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

/// Kafka messages → rows of a columnar batch.
#[derive(Debug)]
pub struct RecordDecoder {
    schema: Schema,
    value: SideCodec,
    key: Option<SideCodec>,
    metadata: Vec<(usize, MetadataKey, DataType)>,
    scratch: Scratch,
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
            .filter_map(|(i, c)| c.metadata.map(|k| (i, k, c.data_type.clone())))
            .collect();
        RecordDecoder {
            schema: schema.clone(),
            value,
            key,
            metadata,
            scratch: Scratch { staged: Staged::new(schema.len()), ..Scratch::default() },
            skipped_malformed: 0,
            skipped_tombstones: 0,
            last_skipped: None,
        }
    }

    /// A builder for the batches this decoder fills, sized for `capacity` rows.
    pub fn builder(&self, capacity: usize) -> BatchBuilder {
        BatchBuilder::new(&self.schema, capacity)
    }

    /// Whether the schema reads the headers (so the caller can avoid collecting them).
    pub fn needs_headers(&self) -> bool {
        self.metadata.iter().any(|(_, k, _)| *k == MetadataKey::Headers)
    }

    /// Decodes `msg` and appends its row to `out` (a builder of this decoder's schema:
    /// [`RecordDecoder::builder`]). `Ok(false)` when the message is skipped (malformed with
    /// `ignore-parse-errors` on, or a tombstone; both counted); `Err` when it is malformed and
    /// the failing part's format has `ignore-parse-errors` off. Nothing is appended unless the
    /// whole message decoded.
    pub fn decode_into(
        &mut self,
        msg: &KafkaMessage<'_>,
        out: &mut BatchBuilder,
    ) -> Result<bool, DecodeError> {
        if msg.value.is_none() && self.value.format.kind() != FormatKind::Raw {
            self.skipped_tombstones += 1;
            return Ok(false);
        }
        self.scratch.staged.reset();
        if let Some(key) = &self.key {
            if let Err(reason) = key.decode(msg.key, &mut self.scratch) {
                let (ignore, part, format) = (key.format.ignore_parse_errors(), key.part, key.format.kind());
                return self.malformed(msg, ignore, part, format, reason);
            }
        }
        if let Err(reason) = self.value.decode(msg.value, &mut self.scratch) {
            let (ignore, format) = (self.value.format.ignore_parse_errors(), self.value.format.kind());
            return self.malformed(msg, ignore, Part::Value, format, reason);
        }
        let staged = &mut self.scratch.staged;
        for (index, key, data_type) in &self.metadata {
            let (index, key) = (*index, *key);
            let slot = match key {
                MetadataKey::Topic => staged.push_text(msg.topic),
                MetadataKey::Partition => Slot::Int(i64::from(msg.partition)),
                MetadataKey::Offset => Slot::Int(msg.offset),
                MetadataKey::Timestamp => match (msg.timestamp, data_type) {
                    (None, _) => Slot::Null,
                    (Some(ts), DataType::Timestamp) => Slot::Timestamp(ts),
                    (Some(ts), _) => Slot::Int(ts),
                },
                MetadataKey::TimestampType => staged.push_text(msg.timestamp_type.name()),
                MetadataKey::LeaderEpoch => msg.leader_epoch.map_or(Slot::Null, |e| Slot::Int(i64::from(e))),
                MetadataKey::Headers => {
                    let start = staged.entries.len();
                    for (k, v) in msg.headers {
                        staged.push_entry(k, *v);
                    }
                    Slot::Map(start..staged.entries.len())
                }
            };
            staged.set(index, slot);
        }
        if let Err(reason) = out.append_staged(staged) {
            // A value the schema cannot hold (an offset past an INT metadata column's range):
            // the record cannot be read as declared, like a malformed one.
            let reason = format!("{reason} (schema: {})", self.schema.describe());
            let (ignore, format) = (self.value.format.ignore_parse_errors(), self.value.format.kind());
            return self.malformed(msg, ignore, Part::Value, format, reason);
        }
        Ok(true)
    }

    /// The row of `msg` alone (tests, tools): `Ok(None)` when the message is skipped. The data
    /// path uses [`RecordDecoder::decode_into`].
    pub fn decode(&mut self, msg: &KafkaMessage<'_>) -> Result<Option<Row>, DecodeError> {
        let mut builder = self.builder(1);
        if !self.decode_into(msg, &mut builder)? {
            return Ok(None);
        }
        Ok(Some(row_of(&builder.finish(), 0)))
    }

    fn malformed<T: Default>(
        &mut self,
        msg: &KafkaMessage<'_>,
        ignore: bool,
        part: Part,
        format: FormatKind,
        reason: String,
    ) -> Result<T, DecodeError> {
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
            Ok(T::default())
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

/// What to produce for one row, owned (tests, tools; the data path uses [`EncodedBatch`]).
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

/// Where one row's key and value are in [`EncodedBatch::buf`].
type EncodedRow = (Option<Range<usize>>, Option<Range<usize>>);

/// The keys and values of a batch's rows, encoded into one buffer that is reused from one batch
/// to the next.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    buf: Vec<u8>,
    /// Per row: where its key and value are in `buf` (`None`: no key, or a null raw payload).
    rows: Vec<EncodedRow>,
    text: String,
}

impl EncodedBatch {
    pub fn new() -> EncodedBatch {
        EncodedBatch::default()
    }

    /// Rows encoded.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The key of row `i`.
    pub fn key(&self, i: usize) -> Option<&[u8]> {
        let r = self.rows.get(i)?.0.clone()?;
        self.buf.get(r)
    }

    /// The value of row `i` (`None`: a tombstone).
    pub fn value(&self, i: usize) -> Option<&[u8]> {
        let r = self.rows.get(i)?.1.clone()?;
        self.buf.get(r)
    }

    /// Bytes of every key and value, for `numBytesOut`.
    pub fn payload_len(&self) -> usize {
        self.buf.len()
    }
}

/// One row to produce, borrowed from its batch and its [`EncodedBatch`].
#[derive(Debug, Clone, Copy)]
pub struct OutRecord<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// From the `timestamp` metadata column; `None` lets the producer choose.
    pub timestamp: Option<i64>,
    /// From the `headers` metadata column.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// Rows → Kafka messages. Read-only metadata columns (topic, partition, offset) are ignored.
#[derive(Debug, Clone)]
pub struct RecordEncoder {
    schema: Schema,
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
            schema: schema.clone(),
            value,
            key,
            timestamp: find(MetadataKey::Timestamp),
            headers: find(MetadataKey::Headers),
        }
    }

    fn check_width(&self, columns: usize) -> Result<(), EncodeError> {
        if columns != self.schema.len() {
            return Err(EncodeError {
                column: "*".into(),
                part: None,
                reason: format!(
                    "the row has {columns} values but the schema has {} columns",
                    self.schema.len()
                ),
            });
        }
        Ok(())
    }

    /// Encodes the keys and values of every row of `batch` (of this encoder's schema) into
    /// `out`, replacing what it held.
    pub fn encode_batch(&self, batch: &RecordBatch, out: &mut EncodedBatch) -> Result<(), EncodeError> {
        self.check_width(batch.num_columns())?;
        out.buf.clear();
        out.rows.clear();
        let cols = ColRef::all(batch);
        for row in 0..batch.num_rows() {
            let key = match &self.key {
                Some(k) => {
                    let start = out.buf.len();
                    let wrote = k.encode(&cols, row, &mut out.text, &mut out.buf)?;
                    wrote.then_some(start..out.buf.len())
                }
                None => None,
            };
            let start = out.buf.len();
            let wrote = self.value.encode(&cols, row, &mut out.text, &mut out.buf)?;
            let value = wrote.then_some(start..out.buf.len());
            out.rows.push((key, value));
        }
        Ok(())
    }

    /// Calls `f` with every row of `batch` as a record to produce: its key and value from
    /// `encoded` (which [`RecordEncoder::encode_batch`] filled from `batch`), its timestamp and
    /// headers from the metadata columns.
    pub fn for_each<E: From<EncodeError>>(
        &self,
        batch: &RecordBatch,
        encoded: &EncodedBatch,
        mut f: impl FnMut(&OutRecord<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let cols = ColRef::all(batch);
        let mut headers = Vec::new();
        for row in 0..encoded.len().min(batch.num_rows()) {
            headers.clear();
            let timestamp = self.timestamp_of(&cols, row)?;
            self.headers_of(&cols, row, &mut headers)?;
            f(&OutRecord { key: encoded.key(row), value: encoded.value(row), timestamp, headers: &headers })?;
        }
        Ok(())
    }

    fn timestamp_of(&self, cols: &[ColRef<'_>], row: usize) -> Result<Option<i64>, EncodeError> {
        let Some((i, name)) = &self.timestamp else { return Ok(None) };
        match cols.get(*i) {
            None => Ok(None),
            Some(c) if c.is_null(row) => Ok(None),
            Some(ColRef::Timestamp(a)) => Ok(Some(a.value(row))),
            Some(c @ (ColRef::Int(_) | ColRef::BigInt(_))) => Ok(c.int(row)),
            Some(other) => Err(EncodeError {
                column: name.clone(),
                part: None,
                reason: format!("the record timestamp must be a TIMESTAMP, got {}", other.kind()),
            }),
        }
    }

    fn headers_of<'a>(
        &self,
        cols: &[ColRef<'a>],
        row: usize,
        out: &mut Vec<(&'a str, Option<&'a [u8]>)>,
    ) -> Result<(), EncodeError> {
        let Some((i, name)) = &self.headers else { return Ok(()) };
        match cols.get(*i) {
            None => Ok(()),
            Some(c) if c.is_null(row) => Ok(()),
            Some(c @ ColRef::Map(_)) => {
                c.map_entries(row, out);
                Ok(())
            }
            Some(other) => Err(EncodeError {
                column: name.clone(),
                part: None,
                reason: format!("the record headers must be a MAP, got {}", other.kind()),
            }),
        }
    }

    /// The record of `row` alone (tests, tools; the data path uses
    /// [`RecordEncoder::encode_batch`]). A value that does not fit its column is an error
    /// naming the column.
    pub fn encode(&self, row: &Row) -> Result<EncodedRecord, EncodeError> {
        self.check_width(row.len())?;
        let batch =
            crate::batch::batch_of_rows(&self.schema, std::slice::from_ref(row)).map_err(|(i, reason)| {
                let column = self.schema.column(i).map(|c| c.name.clone()).unwrap_or_default();
                let part = if Some(i) == self.timestamp.as_ref().map(|t| t.0)
                    || Some(i) == self.headers.as_ref().map(|h| h.0)
                {
                    None
                } else {
                    let in_key = self.key.as_ref().filter(|k| k.fields.iter().any(|f| f.index == i));
                    let side = in_key.unwrap_or(&self.value);
                    Some((side.part, side.format.kind()))
                };
                EncodeError { column, part, reason }
            })?;
        let mut encoded = EncodedBatch::new();
        self.encode_batch(&batch, &mut encoded)?;
        let mut record = None;
        self.for_each(&batch, &encoded, |r| -> Result<(), EncodeError> {
            record = Some(EncodedRecord {
                key: r.key.map(<[u8]>::to_vec),
                value: r.value.map(<[u8]>::to_vec),
                timestamp: r.timestamp,
                headers: r.headers.iter().map(|(k, v)| ((*k).to_string(), v.map(<[u8]>::to_vec))).collect(),
            });
            Ok(())
        })?;
        record.ok_or_else(|| EncodeError {
            column: "*".into(),
            part: None,
            reason: "no row was encoded".into(),
        })
    }
}

#[cfg(test)]
mod tests;
