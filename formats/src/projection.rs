//! [`Projection`]: select, reorder and rename columns.
//!
//! ```yaml
//! select: [id, name as full_name, "`order-id` as order_id"]
//! ```
//!
//! Each item is a column name (bare or in backquotes, as in a [`crate::Filter`]), optionally
//! followed by `as <new name>` (case-insensitive). A column may be selected more than once under
//! different names. The output columns keep their types and lose their metadata role: a
//! selected `offset` column is plain data downstream.
//!
//! [`Projection::by_name`] builds the mapping from one schema onto another by column name (a
//! source's rows onto the columns a sink declares).

use std::sync::Arc;

use arrow_arith::arity::unary;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{new_null_array, Array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow_schema::{DataType as ArrowType, SchemaRef};
use keel_proto::{KeelError, Result};

use crate::filter::{column_name, is_keyword, lex};
use crate::schema::{ColumnDef, DataType, Schema};
use crate::value::Row;

/// A mapping from input rows to output rows, built against a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// Per output column: the input column, or `None` for a constant null.
    sources: Vec<Option<usize>>,
    input: Schema,
    output: Schema,
    /// `output` as an Arrow schema (the batches [`Projection::apply_batch`] returns).
    arrow: SchemaRef,
}

impl Projection {
    /// Parses `select` items against `input`. `field` is the path of the list in the spec
    /// (`sinks[0].select`); errors name the item (`sinks[0].select[1]`).
    pub fn parse(field: &str, items: &[String], input: &Schema) -> Result<Projection> {
        if items.is_empty() {
            return Err(KeelError::invalid_spec(field, "select at least one column"));
        }
        let mut sources = Vec::with_capacity(items.len());
        let mut columns: Vec<ColumnDef> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_field = format!("{field}[{i}]");
            let err = |reason: String| KeelError::invalid_spec(&item_field, reason);
            let tokens = lex(item).map_err(err)?;
            let (name, alias) = match tokens.as_slice() {
                [col] => (column_name(col), column_name(col)),
                [col, as_kw, alias] if is_keyword(as_kw, "as") => (column_name(col), column_name(alias)),
                _ => (None, None),
            };
            let (Some(name), Some(alias)) = (name, alias) else {
                return Err(err(format!("expected `<column>` or `<column> as <name>`, found {item:?}")));
            };
            let index = input
                .index_of(name)
                .ok_or_else(|| err(format!("unknown column '{name}'; columns: {}", input.names())))?;
            if let Some(j) = columns.iter().position(|c| c.name == alias) {
                return Err(err(format!(
                    "output column '{alias}' is already selected by {field}[{j}]; rename one with `as`"
                )));
            }
            let data_type = input.column(index).map_or(DataType::String, |c| c.data_type.clone());
            sources.push(Some(index));
            columns.push(ColumnDef::new(alias, data_type));
        }
        let output = Schema::from_columns(field, &columns)?;
        Ok(Projection::new(sources, input, output))
    }

    /// Maps `input` rows onto `target`'s columns by name. `field` is the path of the target's
    /// columns (`sinks[0].columns`); errors name the target column (`sinks[0].columns[2]`).
    /// Types must match, except that an INT column may feed a BIGINT or DOUBLE one and a BIGINT
    /// one a DOUBLE one. A target metadata column that only a source can fill (topic, partition,
    /// offset) and that the input lacks stays null; the encoder ignores it anyway.
    pub fn by_name(field: &str, input: &Schema, target: &Schema) -> Result<Projection> {
        let mut sources = Vec::with_capacity(target.len());
        for (i, c) in target.columns().iter().enumerate() {
            match input.index_of(&c.name) {
                Some(j) => {
                    let from = input.column(j).map_or(&c.data_type, |ic| &ic.data_type);
                    let fits = *from == c.data_type
                        || matches!(
                            (from, &c.data_type),
                            (DataType::Int, DataType::BigInt)
                                | (DataType::Int, DataType::Double)
                                | (DataType::BigInt, DataType::Double)
                        );
                    if !fits {
                        return Err(KeelError::invalid_spec(
                            format!("{field}[{i}].type"),
                            format!("column '{}' is {} here but {from} in the input", c.name, c.data_type),
                        ));
                    }
                    sources.push(Some(j));
                }
                None if c.metadata.is_some_and(|k| !k.writable()) => sources.push(None),
                None => {
                    return Err(KeelError::invalid_spec(
                        format!("{field}[{i}]"),
                        format!("no input column is named '{}'; input columns: {}", c.name, input.names()),
                    ))
                }
            }
        }
        Ok(Projection::new(sources, input, target.clone()))
    }

    fn new(sources: Vec<Option<usize>>, input: &Schema, output: Schema) -> Projection {
        let arrow = crate::batch::arrow_schema(&output);
        Projection { sources, input: input.clone(), output, arrow }
    }

    /// The schema of the rows [`Projection::apply`] returns.
    pub fn output_schema(&self) -> &Schema {
        &self.output
    }

    /// The output batch: the selected columns of `batch` shared, not copied; a constant null
    /// column where the input has none; an INT column headed for a BIGINT or DOUBLE one, or a BIGINT one for a DOUBLE one (see
    /// [`Projection::by_name`]) converted by a vectorized cast.
    pub fn apply_batch(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.sources.len());
        for (field, src) in self.arrow.fields().iter().zip(&self.sources) {
            let column = match src.and_then(|i| batch.columns().get(i)) {
                None => new_null_array(field.data_type(), rows),
                Some(c) if c.data_type() == field.data_type() => c.clone(),
                Some(c) => match (
                    c.as_primitive_opt::<Int32Type>(),
                    c.as_primitive_opt::<Int64Type>(),
                    field.data_type(),
                ) {
                    (Some(a), _, ArrowType::Int64) => {
                        Arc::new(unary::<_, _, Int64Type>(a, i64::from)) as ArrayRef
                    }
                    (Some(a), _, ArrowType::Float64) => Arc::new(unary::<_, _, Float64Type>(a, f64::from)),
                    (_, Some(a), ArrowType::Float64) => Arc::new(unary::<_, _, Float64Type>(a, |v| v as f64)),
                    _ => {
                        return Err(KeelError::internal(format!(
                            "projection: column {} is {} in the batch, not {}",
                            field.name(),
                            c.data_type(),
                            field.data_type()
                        )))
                    }
                },
            };
            columns.push(column);
        }
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(self.arrow.clone(), columns, &options)
            .map_err(|e| KeelError::internal(format!("projection: {e}")))
    }

    /// The output row of `row` (tests, tools; the data path uses [`Projection::apply_batch`]).
    /// A row that does not fit the input schema gives a row of nulls.
    pub fn apply(&self, row: Row) -> Row {
        let out = crate::batch::batch_of_rows(&self.input, std::slice::from_ref(&row))
            .ok()
            .and_then(|b| self.apply_batch(&b).ok());
        match out {
            Some(b) => crate::batch::row_of(&b, 0),
            None => Row::nulls(self.output.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::MetadataKey;
    use crate::value::Value;

    fn input() -> Schema {
        Schema::from_columns(
            "sources[0].columns",
            &[
                ColumnDef::new("id", DataType::Int),
                ColumnDef::new("name", DataType::String),
                ColumnDef::new("age", DataType::Int),
                ColumnDef::metadata("off", DataType::BigInt, MetadataKey::Offset),
            ],
        )
        .expect("schema")
    }

    fn items(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn sample() -> Row {
        Row::new(vec![Value::Int(1), Value::from("ann"), Value::Int(30), Value::Int(77)])
    }

    #[test]
    fn select_reorders_renames_and_drops_metadata_roles() {
        let p = Projection::parse("sinks[0].select", &items(&["age", "name AS full_name", "off"]), &input())
            .expect("valid");
        assert_eq!(
            p.output_schema().columns(),
            &[
                ColumnDef::new("age", DataType::Int),
                ColumnDef::new("full_name", DataType::String),
                ColumnDef::new("off", DataType::BigInt),
            ]
        );
        assert_eq!(p.apply(sample()).values, vec![Value::Int(30), Value::from("ann"), Value::Int(77)]);
    }

    #[test]
    fn a_column_selected_twice_is_copied() {
        let p = Projection::parse("s", &items(&["name", "name as again", "`id`"]), &input()).expect("valid");
        assert_eq!(p.apply(sample()).values, vec![Value::from("ann"), Value::from("ann"), Value::Int(1)]);
    }

    #[test]
    fn select_errors_name_the_item() {
        for (list, want, needle) in [
            (vec!["id", "nme"], "sinks[0].select[1]", "unknown column 'nme'"),
            (vec!["id", "age as id"], "sinks[0].select[1]", "already selected"),
            (vec!["id as"], "sinks[0].select[0]", "expected"),
            (vec!["id, name"], "sinks[0].select[0]", "expected"),
            (vec!["id to x"], "sinks[0].select[0]", "expected"),
            (vec!["as"], "sinks[0].select[0]", "expected"),
        ] {
            match Projection::parse("sinks[0].select", &items(&list), &input()) {
                Err(KeelError::InvalidSpec { field, reason }) => {
                    assert_eq!(field, want, "{list:?}");
                    assert!(reason.contains(needle), "{list:?}: {reason}");
                }
                other => panic!("{list:?}: {other:?}"),
            }
        }
        assert!(Projection::parse("s", &[], &input()).is_err());
    }

    #[test]
    fn by_name_maps_a_source_onto_the_sink_columns() {
        let sink = Schema::from_columns(
            "sinks[0].columns",
            &[
                ColumnDef::new("age", DataType::BigInt),
                ColumnDef::new("id", DataType::Double),
                ColumnDef::metadata("part", DataType::Int, MetadataKey::Partition),
            ],
        )
        .expect("schema");
        let p = Projection::by_name("sinks[0].columns", &input(), &sink).expect("maps");
        assert_eq!(p.apply(sample()).values, vec![Value::Int(30), Value::Double(1.0), Value::Null]);

        let bad = Schema::from_columns("x", &[ColumnDef::new("name", DataType::Int)]).expect("schema");
        match Projection::by_name("sinks[0].columns", &input(), &bad) {
            Err(KeelError::InvalidSpec { field, reason }) => {
                assert_eq!(field, "sinks[0].columns[0].type");
                assert!(reason.contains("STRING in the input"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let missing =
            Schema::from_columns("x", &[ColumnDef::new("email", DataType::String)]).expect("schema");
        match Projection::by_name("sinks[0].columns", &input(), &missing) {
            Err(KeelError::InvalidSpec { field, reason }) => {
                assert_eq!(field, "sinks[0].columns[0]");
                assert!(reason.contains("'email'"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_short_row_yields_nulls_instead_of_panicking() {
        let p = Projection::parse("s", &items(&["age", "id"]), &input()).expect("valid");
        assert_eq!(p.apply(Row::new(vec![Value::Int(1)])).values, vec![Value::Null, Value::Int(1)]);
    }
}
