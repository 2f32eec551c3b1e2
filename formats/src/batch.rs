//! Columnar batches: the form rows travel in from a source to its sinks.
//!
//! A batch is an Apache Arrow [`RecordBatch`] whose columns follow a [`Schema`] by position,
//! with these Arrow types (every column nullable):
//!
//! | Keel type | Arrow type |
//! | --- | --- |
//! | STRING | `Utf8` |
//! | BOOLEAN | `Boolean` |
//! | INT | `Int32` |
//! | BIGINT | `Int64` |
//! | DOUBLE | `Float64` |
//! | TIMESTAMP | `Timestamp(Millisecond)` (UTC, no zone attached) |
//! | BYTES | `Binary` |
//! | MAP (headers) | `Map<Utf8, Binary>` (entries in order, a key may repeat) |
//! | DATE | `Date32` (days since 1970-01-01) |
//! | DECIMAL(p, s) | `Decimal128(p, s)` |
//! | ROW<name TYPE, ...> | `Struct` of the fields, by name and in order (each nullable) |
//!
//! A [`BatchBuilder`] appends rows column by column. A decoder first stages the values of one
//! message ([`Staged`]: numbers inline, text and bytes in reused buffers), and commits them only
//! once the whole message parsed, so a message that fails half-way leaves no partial row. After
//! [`BatchBuilder::finish`] the builders start again with the capacity the last batch needed
//! (a ROW column's builders too, field by field):
//! in the steady state a batch costs a fixed number of allocations, whatever its row count.
//!
//! [`Row`] and [`Value`] remain the one-row view of a batch ([`row_of`], [`batch_of_rows`]):
//! tests and error messages use them; the data path does not.

use std::ops::Range;
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder,
    Int64Builder, MapBuilder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Float64Type, Int32Type, Int64Type, TimestampMillisecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch, RecordBatchOptions, StructArray};
use arrow_buffer::NullBufferBuilder;
use arrow_schema::{DataType as ArrowType, Field, Fields, Schema as ArrowSchema, SchemaRef, TimeUnit};

use crate::schema::{DataType, RowField, Schema};
use crate::value::{Row, Value};

/// The Arrow type of a column of type `t`.
pub fn arrow_type(t: &DataType) -> ArrowType {
    match t {
        DataType::String => ArrowType::Utf8,
        DataType::Boolean => ArrowType::Boolean,
        DataType::Int => ArrowType::Int32,
        DataType::BigInt => ArrowType::Int64,
        DataType::Double => ArrowType::Float64,
        DataType::Timestamp => ArrowType::Timestamp(TimeUnit::Millisecond, None),
        DataType::Bytes => ArrowType::Binary,
        // Exactly what a MapBuilder produces (field names, nullability).
        DataType::Map => map_builder(0).finish().data_type().clone(),
        DataType::Date => ArrowType::Date32,
        DataType::Decimal { precision, scale } => ArrowType::Decimal128(*precision, *scale),
        DataType::Row(fields) => ArrowType::Struct(struct_fields(fields)),
    }
}

/// The Arrow fields of a ROW's fields (same names and order; every field nullable).
fn struct_fields(fields: &[RowField]) -> Fields {
    fields.iter().map(|f| Field::new(f.name.clone(), arrow_type(&f.data_type), true)).collect()
}

/// The Arrow schema of `schema` (same names and order; every field nullable).
pub fn arrow_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> =
        schema.columns().iter().map(|c| Field::new(c.name.clone(), arrow_type(&c.data_type), true)).collect();
    Arc::new(ArrowSchema::new(fields))
}

/// A batch with no column and `rows` rows (a source without columns, or a projection to none).
pub fn empty_batch(schema: &SchemaRef, rows: usize) -> RecordBatch {
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    RecordBatch::try_new_with_options(schema.clone(), Vec::new(), &options)
        .unwrap_or_else(|_| RecordBatch::new_empty(schema.clone()))
}

fn map_builder(capacity: usize) -> MapBuilder<StringBuilder, BinaryBuilder> {
    MapBuilder::with_capacity(None, StringBuilder::new(), BinaryBuilder::new(), capacity)
}

/// One value of a message, staged before it is committed to a [`BatchBuilder`]: text and bytes
/// are ranges of the [`Staged`] buffers.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) enum Slot {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Double(f64),
    /// Milliseconds since the epoch.
    Timestamp(i64),
    Text(Range<usize>),
    Bytes(Range<usize>),
    /// Entries of [`Staged::entries`].
    Map(Range<usize>),
    /// Days since 1970-01-01.
    Date(i32),
    /// The unscaled value at its column's scale (checked against its precision when parsed).
    Decimal(i128),
    /// A ROW's fields, in order: slots of [`Staged::children`].
    Row(Range<usize>),
}

/// The values of one message being decoded, one [`Slot`] per schema column. Reused from one
/// message to the next: its buffers keep their capacity.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    pub slots: Vec<Slot>,
    pub text: String,
    pub bytes: Vec<u8>,
    /// MAP entries: a key in `text`, a value in `bytes` (or none).
    pub entries: Vec<(Range<usize>, Option<Range<usize>>)>,
    /// The field values of ROW slots (a ROW's fields are consecutive; a nested ROW's are
    /// further on).
    pub children: Vec<Slot>,
}

impl Staged {
    pub fn new(width: usize) -> Staged {
        Staged { slots: vec![Slot::Null; width], ..Staged::default() }
    }

    /// Every column null again, buffers emptied (their capacity kept).
    pub fn reset(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = Slot::Null);
        self.text.clear();
        self.bytes.clear();
        self.entries.clear();
        self.children.clear();
    }

    /// Reserves the slots of a ROW of `width` fields, all null: fill them with
    /// [`Staged::set_child`], and stage the ROW as `Slot::Row(range)`.
    pub fn push_row(&mut self, width: usize) -> Range<usize> {
        let start = self.children.len();
        self.children.resize(start + width, Slot::Null);
        start..self.children.len()
    }

    pub fn set_child(&mut self, index: usize, slot: Slot) {
        if let Some(s) = self.children.get_mut(index) {
            *s = slot;
        }
    }

    pub fn set(&mut self, column: usize, slot: Slot) {
        if let Some(s) = self.slots.get_mut(column) {
            *s = slot;
        }
    }

    /// Stages `s` as text and returns its slot.
    pub fn push_text(&mut self, s: &str) -> Slot {
        let start = self.text.len();
        self.text.push_str(s);
        Slot::Text(start..self.text.len())
    }

    pub fn push_bytes(&mut self, b: &[u8]) -> Slot {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        Slot::Bytes(start..self.bytes.len())
    }

    /// Stages one MAP entry; the entries of one MAP value are consecutive.
    pub fn push_entry(&mut self, key: &str, value: Option<&[u8]>) {
        let k = self.text.len();
        self.text.push_str(key);
        let key = k..self.text.len();
        let value = value.map(|v| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(v);
            start..self.bytes.len()
        });
        self.entries.push((key, value));
    }
}

/// One column's builder. Held in a vector of a few entries per batch builder, so the size
/// difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Column {
    String(StringBuilder),
    Boolean(BooleanBuilder),
    Int(Int32Builder),
    BigInt(Int64Builder),
    Double(Float64Builder),
    Timestamp(TimestampMillisecondBuilder),
    Bytes(BinaryBuilder),
    Map(MapBuilder<StringBuilder, BinaryBuilder>),
    Date(Date32Builder),
    Decimal(Decimal128Builder),
    Row(RowColumn),
}

/// A ROW column: a builder per field, and the rows' own validity.
struct RowColumn {
    fields: Fields,
    types: Vec<DataType>,
    children: Vec<Column>,
    /// Byte capacity each field's builder starts a batch with (as [`BatchBuilder`] keeps it).
    data_capacity: Vec<usize>,
    nulls: NullBufferBuilder,
}

impl RowColumn {
    fn new(fields: &[RowField], rows: usize, data: usize) -> RowColumn {
        let types: Vec<DataType> = fields.iter().map(|f| f.data_type.clone()).collect();
        RowColumn {
            fields: struct_fields(fields),
            children: types.iter().map(|t| Column::new(t, rows, data)).collect(),
            data_capacity: vec![data; types.len()],
            types,
            nulls: NullBufferBuilder::new(rows),
        }
    }

    fn append_null(&mut self) {
        self.nulls.append_null();
        self.children.iter_mut().for_each(Column::append_null);
    }

    /// The rows so far as a struct array; the field builders start again sized for `rows`
    /// rows (and the data their fields held).
    fn finish_renew(&mut self, rows: usize) -> ArrayRef {
        let arrays: Vec<ArrayRef> = self
            .children
            .iter_mut()
            .zip(&self.types)
            .zip(self.data_capacity.iter_mut())
            .map(|((c, t), d)| c.finish_renew(t, rows, d))
            .collect();
        let len = arrays.first().map_or(0, |a| a.len());
        let nulls = self.nulls.finish();
        self.nulls = NullBufferBuilder::new(rows);
        // The field arrays have the fields' types and one length by construction.
        match StructArray::try_new(self.fields.clone(), arrays, nulls) {
            Ok(a) => Arc::new(a),
            Err(_) => Arc::new(StructArray::new_null(self.fields.clone(), len)),
        }
    }
}

impl Column {
    fn new(t: &DataType, rows: usize, data: usize) -> Column {
        match t {
            DataType::String => Column::String(StringBuilder::with_capacity(rows, data)),
            DataType::Boolean => Column::Boolean(BooleanBuilder::with_capacity(rows)),
            DataType::Int => Column::Int(Int32Builder::with_capacity(rows)),
            DataType::BigInt => Column::BigInt(Int64Builder::with_capacity(rows)),
            DataType::Double => Column::Double(Float64Builder::with_capacity(rows)),
            DataType::Timestamp => Column::Timestamp(TimestampMillisecondBuilder::with_capacity(rows)),
            DataType::Bytes => Column::Bytes(BinaryBuilder::with_capacity(rows, data)),
            DataType::Map => Column::Map(map_builder(rows)),
            DataType::Date => Column::Date(Date32Builder::with_capacity(rows)),
            DataType::Decimal { precision, scale } => Column::Decimal(
                Decimal128Builder::with_capacity(rows)
                    .with_data_type(ArrowType::Decimal128(*precision, *scale)),
            ),
            DataType::Row(fields) => Column::Row(RowColumn::new(fields, rows, data)),
        }
    }

    fn append_null(&mut self) {
        match self {
            Column::String(b) => b.append_null(),
            Column::Boolean(b) => b.append_null(),
            Column::Int(b) => b.append_null(),
            Column::BigInt(b) => b.append_null(),
            Column::Double(b) => b.append_null(),
            Column::Timestamp(b) => b.append_null(),
            Column::Bytes(b) => b.append_null(),
            Column::Map(b) => {
                let _ = b.append(false);
            }
            Column::Date(b) => b.append_null(),
            Column::Decimal(b) => b.append_null(),
            Column::Row(r) => r.append_null(),
        }
    }

    /// The values so far as an array; the column starts again sized for `rows` rows and for
    /// the larger of `data` and the bytes this array holds (`data` is updated).
    fn finish_renew(&mut self, t: &DataType, rows: usize, data: &mut usize) -> ArrayRef {
        let array: ArrayRef = match self {
            Column::Row(r) => return r.finish_renew(rows),
            Column::String(b) => Arc::new(b.finish()),
            Column::Boolean(b) => Arc::new(b.finish()),
            Column::Int(b) => Arc::new(b.finish()),
            Column::BigInt(b) => Arc::new(b.finish()),
            Column::Double(b) => Arc::new(b.finish()),
            Column::Timestamp(b) => Arc::new(b.finish()),
            Column::Bytes(b) => Arc::new(b.finish()),
            Column::Map(b) => Arc::new(b.finish()),
            Column::Date(b) => Arc::new(b.finish()),
            Column::Decimal(b) => Arc::new(b.finish()),
        };
        let used = match array.data_type() {
            ArrowType::Utf8 => array.as_string::<i32>().values().len(),
            ArrowType::Binary => array.as_binary::<i32>().values().len(),
            _ => 0,
        };
        *data = (*data).max(used);
        *self = Column::new(t, rows, *data);
        array
    }

    /// Appends a staged value ([`check_slot`] said it fits; a slot of another kind appends a
    /// null).
    fn append_slot(&mut self, slot: &Slot, staged: &Staged) {
        let text = |r: &Range<usize>| staged.text.get(r.clone()).unwrap_or_default();
        let bytes = |r: &Range<usize>| staged.bytes.get(r.clone()).unwrap_or_default();
        match (self, slot) {
            (c, Slot::Null) => c.append_null(),
            (Column::String(b), Slot::Text(r)) => b.append_value(text(r)),
            (Column::Boolean(b), Slot::Bool(v)) => b.append_value(*v),
            (Column::Int(b), Slot::Int(v)) => b.append_value(i32::try_from(*v).unwrap_or_default()),
            (Column::BigInt(b), Slot::Int(v)) => b.append_value(*v),
            (Column::Double(b), Slot::Double(v)) => b.append_value(*v),
            (Column::Timestamp(b), Slot::Timestamp(v)) => b.append_value(*v),
            (Column::Bytes(b), Slot::Bytes(r)) => b.append_value(bytes(r)),
            (Column::Map(b), Slot::Map(r)) => {
                for (k, v) in staged.entries.get(r.clone()).unwrap_or_default() {
                    b.keys().append_value(text(k));
                    match v {
                        Some(v) => b.values().append_value(bytes(v)),
                        None => b.values().append_null(),
                    }
                }
                let _ = b.append(true);
            }
            (Column::Date(b), Slot::Date(v)) => b.append_value(*v),
            (Column::Decimal(b), Slot::Decimal(v)) => b.append_value(*v),
            (Column::Row(r), Slot::Row(range)) => {
                r.nulls.append_non_null();
                let slots = staged.children.get(range.clone()).unwrap_or_default();
                for (i, child) in r.children.iter_mut().enumerate() {
                    child.append_slot(slots.get(i).unwrap_or(&Slot::Null), staged);
                }
            }
            (c, _) => c.append_null(),
        }
    }

    /// Appends a value ([`check_value`] said it fits; a value of another kind appends a null).
    fn append_value(&mut self, t: &DataType, v: &Value) {
        match (self, v) {
            (c, Value::Null) => c.append_null(),
            (Column::String(b), Value::String(s)) => b.append_value(s),
            (Column::Boolean(b), Value::Bool(v)) => b.append_value(*v),
            (Column::Int(b), Value::Int(v)) => b.append_value(i32::try_from(*v).unwrap_or_default()),
            (Column::BigInt(b), Value::Int(v)) => b.append_value(*v),
            (Column::Double(b), Value::Double(v)) => b.append_value(*v),
            (Column::Double(b), Value::Int(v)) => b.append_value(*v as f64),
            (Column::Timestamp(b), Value::Timestamp(v) | Value::Int(v)) => b.append_value(*v),
            (Column::Bytes(b), Value::Bytes(v)) => b.append_value(v),
            (Column::Map(b), Value::Map(entries)) => {
                for (k, v) in entries {
                    b.keys().append_value(k);
                    match v {
                        Some(v) => b.values().append_value(v),
                        None => b.values().append_null(),
                    }
                }
                let _ = b.append(true);
            }
            (Column::Date(b), Value::Date(v)) => b.append_value(*v),
            (Column::Decimal(b), v) => match decimal_value(t, v) {
                Some(Ok(unscaled)) => b.append_value(unscaled),
                _ => b.append_null(),
            },
            (Column::Row(r), Value::Row(values)) => {
                r.nulls.append_non_null();
                for (i, (child, t)) in r.children.iter_mut().zip(&r.types).enumerate() {
                    child.append_value(t, values.get(i).unwrap_or(&Value::Null));
                }
            }
            (c, _) => c.append_null(),
        }
    }
}

/// Whether a staged `slot` fits a column of type `t`: `Err` says why not, as the tail of a
/// message that starts with the column (`: 1099511627776 is out of range for INT`,
/// ` (INT) was given Text(0..1)`, `.owner (STRING) was given Int(1)`).
fn check_slot(t: &DataType, slot: &Slot, staged: &Staged) -> Result<(), String> {
    if let (DataType::Int, Slot::Int(n)) = (t, slot) {
        if i32::try_from(*n).is_err() {
            return Err(format!(": {n} is out of range for INT"));
        }
    }
    if let (DataType::Row(fields), Slot::Row(range)) = (t, slot) {
        let Some(slots) = staged.children.get(range.clone()).filter(|s| s.len() == fields.len()) else {
            return Err(format!(" ({t}) was given {} field values", range.len()));
        };
        for (f, s) in fields.iter().zip(slots) {
            check_slot(&f.data_type, s, staged).map_err(|e| format!(".{}{e}", f.name))?;
        }
        return Ok(());
    }
    let fits = matches!(
        (t, slot),
        (_, Slot::Null)
            | (DataType::String, Slot::Text(_))
            | (DataType::Boolean, Slot::Bool(_))
            | (DataType::Int | DataType::BigInt, Slot::Int(_))
            | (DataType::Double, Slot::Double(_))
            | (DataType::Timestamp, Slot::Timestamp(_))
            | (DataType::Bytes, Slot::Bytes(_))
            | (DataType::Map, Slot::Map(_))
            | (DataType::Date, Slot::Date(_))
            | (DataType::Decimal { .. }, Slot::Decimal(_))
    );
    if fits {
        Ok(())
    } else {
        Err(format!(" ({t}) was given {slot:?}"))
    }
}

/// Whether `v` fits a column of type `t` (see [`BatchBuilder::append_row`]): `Err` is the
/// reason, naming the ROW field it is in (`field 'owner': a INT value in a STRING column`).
fn check_value(t: &DataType, v: &Value) -> Result<(), String> {
    if let DataType::Decimal { .. } = t {
        match decimal_value(t, v) {
            Some(Ok(_)) => return Ok(()),
            Some(Err(reason)) => return Err(reason),
            None => {}
        }
    }
    if let (DataType::Row(fields), Value::Row(values)) = (t, v) {
        if values.len() != fields.len() {
            return Err(format!("{} values for the {} fields of {t}", values.len(), fields.len()));
        }
        for (f, v) in fields.iter().zip(values) {
            check_value(&f.data_type, v).map_err(|e| format!("field '{}': {e}", f.name))?;
        }
        return Ok(());
    }
    let fits = matches!(
        (t, v),
        (_, Value::Null)
            | (DataType::String, Value::String(_))
            | (DataType::Boolean, Value::Bool(_))
            | (DataType::BigInt, Value::Int(_))
            | (DataType::Double, Value::Double(_) | Value::Int(_))
            | (DataType::Timestamp, Value::Timestamp(_) | Value::Int(_))
            | (DataType::Bytes, Value::Bytes(_))
            | (DataType::Map, Value::Map(_))
            | (DataType::Date, Value::Date(_))
    ) || matches!((t, v), (DataType::Int, Value::Int(n)) if i32::try_from(*n).is_ok());
    if fits {
        return Ok(());
    }
    Err(match (t, v) {
        (DataType::Int, Value::Int(n)) => format!("{n} is out of range for INT"),
        _ => format!("a {} value in a {t} column", v.kind()),
    })
}

/// Appends rows of one schema and finishes them into [`RecordBatch`]es.
pub struct BatchBuilder {
    schema: SchemaRef,
    types: Vec<DataType>,
    columns: Vec<Column>,
    rows: usize,
    /// Row and byte capacity the builders start each batch with (the largest batch so far).
    capacity: usize,
    data_capacity: Vec<usize>,
}

impl std::fmt::Debug for BatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder").field("types", &self.types).field("rows", &self.rows).finish()
    }
}

impl BatchBuilder {
    /// A builder for batches of `schema`, sized for `capacity` rows to start with.
    pub fn new(schema: &Schema, capacity: usize) -> BatchBuilder {
        let types: Vec<DataType> = schema.columns().iter().map(|c| c.data_type.clone()).collect();
        let data_capacity = vec![capacity * 16; types.len()];
        let columns = types.iter().zip(&data_capacity).map(|(t, d)| Column::new(t, capacity, *d)).collect();
        BatchBuilder { schema: arrow_schema(schema), types, columns, rows: 0, capacity, data_capacity }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows appended since the last [`BatchBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends the staged row. Slots were staged by the codecs for their column's type; a slot
    /// of another kind, or a number out of an INT column's range (an `offset` metadata column
    /// declared INT), is an error naming the column index, and appends nothing.
    pub(crate) fn append_staged(&mut self, staged: &Staged) -> Result<(), String> {
        // Check first, so that a bad slot leaves no partial row.
        for (i, (slot, t)) in staged.slots.iter().zip(&self.types).enumerate() {
            check_slot(t, slot, staged).map_err(|e| format!("column {i}{e}"))?;
        }
        for (column, slot) in self.columns.iter_mut().zip(&staged.slots) {
            column.append_slot(slot, staged);
        }
        self.rows += 1;
        Ok(())
    }

    /// Appends `row`, converting INT to DOUBLE and INT or DECIMAL to a DECIMAL column's scale
    /// (rounding half up) where the column wants it (inside ROW values too); a value that does
    /// not fit its column is an error naming the column index (and the ROW field), and appends
    /// nothing.
    pub fn append_row(&mut self, row: &Row) -> Result<(), (usize, String)> {
        for (i, t) in self.types.iter().enumerate() {
            check_value(t, row.get(i)).map_err(|reason| (i, reason))?;
        }
        for (i, (column, t)) in self.columns.iter_mut().zip(&self.types).enumerate() {
            column.append_value(t, row.get(i));
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows appended so far as a batch; the builder starts again, sized for the larger of
    /// its start capacity and this batch.
    pub fn finish(&mut self) -> RecordBatch {
        let rows = std::mem::take(&mut self.rows);
        if self.columns.is_empty() {
            return empty_batch(&self.schema, rows);
        }
        self.capacity = self.capacity.max(rows);
        let mut arrays = Vec::with_capacity(self.columns.len());
        for ((column, t), d) in self.columns.iter_mut().zip(&self.types).zip(self.data_capacity.iter_mut()) {
            arrays.push(column.finish_renew(t, self.capacity, d));
        }
        // The arrays have the schema's types and one length by construction.
        RecordBatch::try_new(self.schema.clone(), arrays)
            .unwrap_or_else(|_| RecordBatch::new_empty(self.schema.clone()))
    }
}

/// The unscaled value of `v` in a DECIMAL column of type `t`: `None` when `v` is no number a
/// DECIMAL takes (INT or DECIMAL), an error when it does not fit the precision.
fn decimal_value(t: &DataType, v: &Value) -> Option<Result<i128, String>> {
    let DataType::Decimal { precision, scale } = *t else { return None };
    let (unscaled, from) = match v {
        Value::Int(n) => (i128::from(*n), 0),
        Value::Decimal { unscaled, scale } => (*unscaled, *scale),
        _ => return None,
    };
    Some(
        crate::text::rescale_decimal(unscaled, from, precision, scale)
            .ok_or_else(|| format!("{v} is out of range for {t}")),
    )
}

/// A batch of `rows` (each must fit `schema`: see [`BatchBuilder::append_row`]).
pub fn batch_of_rows(schema: &Schema, rows: &[Row]) -> Result<RecordBatch, (usize, String)> {
    let mut b = BatchBuilder::new(schema, rows.len());
    for row in rows {
        b.append_row(row)?;
    }
    Ok(b.finish())
}

/// Row `i` of `batch` as values (past the end: an empty row).
pub fn row_of(batch: &RecordBatch, i: usize) -> Row {
    if i >= batch.num_rows() {
        return Row::default();
    }
    Row::new(batch.columns().iter().map(|c| value_at(c.as_ref(), i)).collect())
}

/// Every row of `batch`.
pub fn rows_of(batch: &RecordBatch) -> Vec<Row> {
    (0..batch.num_rows()).map(|i| row_of(batch, i)).collect()
}

/// The value at row `i` of `array` (a column of one of the types above; others read as null).
pub fn value_at(array: &dyn Array, i: usize) -> Value {
    if array.is_null(i) {
        return Value::Null;
    }
    match array.data_type() {
        ArrowType::Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        ArrowType::Boolean => Value::Bool(array.as_boolean().value(i)),
        ArrowType::Int32 => Value::Int(i64::from(array.as_primitive::<Int32Type>().value(i))),
        ArrowType::Int64 => Value::Int(array.as_primitive::<Int64Type>().value(i)),
        ArrowType::Float64 => Value::Double(array.as_primitive::<Float64Type>().value(i)),
        ArrowType::Timestamp(TimeUnit::Millisecond, _) => {
            Value::Timestamp(array.as_primitive::<TimestampMillisecondType>().value(i))
        }
        ArrowType::Binary => Value::Bytes(array.as_binary::<i32>().value(i).to_vec()),
        ArrowType::Date32 => Value::Date(array.as_primitive::<Date32Type>().value(i)),
        ArrowType::Decimal128(_, scale) => {
            Value::Decimal { unscaled: array.as_primitive::<Decimal128Type>().value(i), scale: *scale }
        }
        ArrowType::Struct(_) => {
            Value::Row(array.as_struct().columns().iter().map(|c| value_at(c.as_ref(), i)).collect())
        }
        ArrowType::Map(_, _) => {
            let entries = array.as_map().value(i);
            let keys = entries.column(0).as_string::<i32>();
            let values = entries.column(1).as_binary::<i32>();
            Value::Map(
                (0..entries.len())
                    .map(|j| {
                        let v = (!values.is_null(j)).then(|| values.value(j).to_vec());
                        (keys.value(j).to_string(), v)
                    })
                    .collect(),
            )
        }
        _ => Value::Null,
    }
}

/// A column of a batch, downcast once per batch for the encoders.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ColRef<'a> {
    String(&'a arrow_array::StringArray),
    Boolean(&'a arrow_array::BooleanArray),
    Int(&'a arrow_array::Int32Array),
    BigInt(&'a arrow_array::Int64Array),
    Double(&'a arrow_array::Float64Array),
    Timestamp(&'a arrow_array::TimestampMillisecondArray),
    Bytes(&'a arrow_array::BinaryArray),
    Map(&'a arrow_array::MapArray),
    Date(&'a arrow_array::Date32Array),
    Decimal(&'a arrow_array::Decimal128Array),
    Row(&'a StructArray),
    /// A column of a type no Keel column has.
    Other(&'a dyn Array),
}

impl<'a> ColRef<'a> {
    pub fn of(array: &'a dyn Array) -> ColRef<'a> {
        match array.data_type() {
            ArrowType::Utf8 => ColRef::String(array.as_string::<i32>()),
            ArrowType::Boolean => ColRef::Boolean(array.as_boolean()),
            ArrowType::Int32 => ColRef::Int(array.as_primitive::<Int32Type>()),
            ArrowType::Int64 => ColRef::BigInt(array.as_primitive::<Int64Type>()),
            ArrowType::Float64 => ColRef::Double(array.as_primitive::<Float64Type>()),
            ArrowType::Timestamp(TimeUnit::Millisecond, _) => {
                ColRef::Timestamp(array.as_primitive::<TimestampMillisecondType>())
            }
            ArrowType::Binary => ColRef::Bytes(array.as_binary::<i32>()),
            ArrowType::Map(_, _) => ColRef::Map(array.as_map()),
            ArrowType::Date32 => ColRef::Date(array.as_primitive::<Date32Type>()),
            ArrowType::Decimal128(_, _) => ColRef::Decimal(array.as_primitive::<Decimal128Type>()),
            ArrowType::Struct(_) => ColRef::Row(array.as_struct()),
            _ => ColRef::Other(array),
        }
    }

    /// The columns of `batch`, in order.
    pub fn all(batch: &'a RecordBatch) -> Vec<ColRef<'a>> {
        batch.columns().iter().map(|c| ColRef::of(c.as_ref())).collect()
    }

    fn array(&self) -> &'a dyn Array {
        match *self {
            ColRef::String(a) => a,
            ColRef::Boolean(a) => a,
            ColRef::Int(a) => a,
            ColRef::BigInt(a) => a,
            ColRef::Double(a) => a,
            ColRef::Timestamp(a) => a,
            ColRef::Bytes(a) => a,
            ColRef::Map(a) => a,
            ColRef::Date(a) => a,
            ColRef::Decimal(a) => a,
            ColRef::Row(a) => a,
            ColRef::Other(a) => a,
        }
    }

    pub fn is_null(&self, row: usize) -> bool {
        self.array().is_null(row)
    }

    /// The Keel type name of the column's values, for error messages (INT and BIGINT both say
    /// INT, as [`Value::kind`] does).
    pub fn kind(&self) -> &'static str {
        match self {
            ColRef::String(_) => "STRING",
            ColRef::Boolean(_) => "BOOLEAN",
            ColRef::Int(_) | ColRef::BigInt(_) => "INT",
            ColRef::Double(_) => "DOUBLE",
            ColRef::Timestamp(_) => "TIMESTAMP",
            ColRef::Bytes(_) => "BYTES",
            ColRef::Map(_) => "MAP",
            ColRef::Date(_) => "DATE",
            ColRef::Decimal(_) => "DECIMAL",
            ColRef::Row(_) => "ROW",
            ColRef::Other(_) => "UNKNOWN",
        }
    }

    /// An integer value (INT, BIGINT) at `row`.
    pub fn int(&self, row: usize) -> Option<i64> {
        match self {
            ColRef::Int(a) => Some(i64::from(a.value(row))),
            ColRef::BigInt(a) => Some(a.value(row)),
            _ => None,
        }
    }

    /// The entries of the MAP at `row`, borrowed.
    pub fn map_entries(&self, row: usize, out: &mut Vec<(&'a str, Option<&'a [u8]>)>) {
        if let ColRef::Map(m) = self {
            let offsets = m.value_offsets();
            let (Some(&start), Some(&end)) = (offsets.get(row), offsets.get(row + 1)) else { return };
            let keys = m.keys().as_string::<i32>();
            let values = m.values().as_binary::<i32>();
            for j in start as usize..end as usize {
                out.push((keys.value(j), (!values.is_null(j)).then(|| values.value(j))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::ColumnDef;

    fn schema() -> Schema {
        Schema::from_columns(
            "c",
            &[
                ColumnDef::new("s", DataType::String),
                ColumnDef::new("b", DataType::Boolean),
                ColumnDef::new("i", DataType::Int),
                ColumnDef::new("l", DataType::BigInt),
                ColumnDef::new("d", DataType::Double),
                ColumnDef::new("t", DataType::Timestamp),
                ColumnDef::new("y", DataType::Bytes),
                ColumnDef::new("m", DataType::Map),
            ],
        )
        .unwrap_or_else(|e| panic!("schema: {e}"))
    }

    /// Rows of every type (and nulls) come back unchanged from a batch, over several batches of
    /// one builder (whose builders restart after each finish).
    #[test]
    fn rows_round_trip_through_batches() {
        let rows = vec![
            Row::new(vec![
                Value::from("a"),
                Value::Bool(true),
                Value::Int(-5),
                Value::Int(i64::MAX),
                Value::Double(0.5),
                Value::Timestamp(7),
                Value::Bytes(vec![1, 2]),
                Value::Map(vec![("k".into(), Some(b"v".to_vec())), ("k".into(), None)]),
            ]),
            Row::nulls(8),
        ];
        let mut b = BatchBuilder::new(&schema(), 1);
        for _ in 0..3 {
            for r in &rows {
                assert_eq!(b.append_row(r), Ok(()));
            }
            let batch = b.finish();
            assert_eq!(batch.schema(), *b.schema());
            assert_eq!(rows_of(&batch), rows);
            assert!(b.is_empty());
        }
    }

    /// DATE and DECIMAL columns are Arrow Date32 and Decimal128(p, s) arrays whose rows read
    /// back as the values appended; an INT or a DECIMAL of another scale is rescaled to the
    /// column's (half up), and one past the precision appends nothing and names the column.
    #[test]
    fn date_and_decimal_rows_round_trip_and_rescale() -> Result<(), String> {
        let schema = Schema::from_columns(
            "c",
            &[
                ColumnDef::new("d", DataType::Date),
                ColumnDef::new("p", DataType::Decimal { precision: 4, scale: 1 }),
            ],
        )
        .map_err(|e| e.to_string())?;
        let dec = |unscaled, scale| Value::Decimal { unscaled, scale };
        let mut b = BatchBuilder::new(&schema, 2);
        let rows = [
            Row::new(vec![Value::Date(-3), dec(-9_999, 1)]),
            Row::new(vec![Value::Null, Value::Null]),
            Row::new(vec![Value::Date(7), Value::Int(12)]),
            Row::new(vec![Value::Date(7), dec(1_235, 2)]),
        ];
        for r in &rows {
            b.append_row(r).map_err(|(i, e)| format!("{i}: {e}"))?;
        }
        assert_eq!(
            b.append_row(&Row::new(vec![Value::Null, Value::Int(1000)])),
            Err((1, "1000 is out of range for DECIMAL(4, 1)".into()))
        );
        assert_eq!(
            b.append_row(&Row::new(vec![Value::Int(1), Value::Null])),
            Err((0, "a INT value in a DATE column".into()))
        );
        let batch = b.finish();
        assert_eq!(batch.column(0).data_type(), &ArrowType::Date32);
        assert_eq!(batch.column(1).data_type(), &ArrowType::Decimal128(4, 1));
        assert_eq!(
            rows_of(&batch),
            vec![
                rows[0].clone(),
                rows[1].clone(),
                Row::new(vec![Value::Date(7), dec(120, 1)]),
                Row::new(vec![Value::Date(7), dec(124, 1)]),
            ]
        );
        Ok(())
    }

    /// ROW columns are Arrow structs whose rows read back as the values appended (a null row,
    /// null fields, a nested row, a DECIMAL field rescaled), over several batches of one
    /// builder; a value that does not fit a field appends nothing and names the field.
    #[test]
    fn row_values_round_trip_through_struct_columns() -> Result<(), String> {
        let row_type: DataType = "ROW<a STRING, b ROW<c INT, d DECIMAL(4, 1)>>".parse()?;
        let columns = [ColumnDef::new("id", DataType::Int), ColumnDef::new("p", row_type)];
        let schema = Schema::from_columns("c", &columns).map_err(|e| e.to_string())?;
        let dec = |unscaled| Value::Decimal { unscaled, scale: 1 };
        let rows = [
            Row::new(vec![
                Value::Int(1),
                Value::Row(vec![Value::from("x"), Value::Row(vec![Value::Int(2), dec(15)])]),
            ]),
            Row::new(vec![Value::Int(2), Value::Null]),
            Row::new(vec![Value::Null, Value::Row(vec![Value::Null, Value::Null])]),
            Row::new(vec![
                Value::Int(3),
                Value::Row(vec![Value::from(""), Value::Row(vec![Value::Null, Value::Null])]),
            ]),
        ];
        let mut b = BatchBuilder::new(&schema, 1);
        for _ in 0..3 {
            for r in &rows {
                b.append_row(r).map_err(|(i, e)| format!("{i}: {e}"))?;
            }
            let batch = b.finish();
            assert!(matches!(batch.column(1).data_type(), ArrowType::Struct(f) if f.len() == 2));
            assert_eq!(batch.column(1).null_count(), 1);
            assert_eq!(rows_of(&batch), rows);
        }
        let inner = |d| Value::Row(vec![Value::Null, Value::Row(vec![Value::Null, d])]);
        b.append_row(&Row::new(vec![Value::Null, inner(Value::Int(7))]))
            .map_err(|(i, e)| format!("{i}: {e}"))?;
        assert_eq!(row_of(&b.finish(), 0).get(1), &inner(dec(70)));
        let p = "ROW<a STRING, b ROW<c INT, d DECIMAL(4, 1)>>";
        for (bad, reason) in [
            (
                Value::Row(vec![Value::Int(1), Value::Null]),
                "field 'a': a INT value in a STRING column".to_string(),
            ),
            (
                Value::Row(vec![Value::Null, Value::Row(vec![Value::Int(1 << 40), Value::Null])]),
                "field 'b': field 'c': 1099511627776 is out of range for INT".to_string(),
            ),
            (
                inner(Value::Int(1000)),
                "field 'b': field 'd': 1000 is out of range for DECIMAL(4, 1)".to_string(),
            ),
            (Value::Row(vec![Value::Null]), format!("1 values for the 2 fields of {p}")),
            (Value::from("x"), format!("a STRING value in a {p} column")),
        ] {
            assert_eq!(b.append_row(&Row::new(vec![Value::Int(1), bad])), Err((1, reason)));
        }
        assert!(b.is_empty());
        assert_eq!(b.finish().num_rows(), 0);
        Ok(())
    }

    /// A value that does not fit its column appends nothing and names the column.
    #[test]
    fn a_misfit_value_appends_nothing() {
        let mut b = BatchBuilder::new(&schema(), 4);
        let mut row = Row::nulls(8);
        row.values[2] = Value::Int(1 << 40);
        assert_eq!(b.append_row(&row), Err((2, format!("{} is out of range for INT", 1i64 << 40))));
        row.values[2] = Value::from("x");
        assert_eq!(b.append_row(&row), Err((2, "a STRING value in a INT column".into())));
        assert!(b.is_empty());
        assert_eq!(b.finish().num_rows(), 0);
    }
}
