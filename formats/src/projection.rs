//! [`Projection`]: compute, select, reorder and rename columns.
//!
//! ```yaml
//! select: [id, "name AS full_name", "`order-id` AS order_id", "UPPER(country) AS country", "age + 1 AS next_age"]
//! ```
//!
//! Each item is a SQL expression (anything [`crate::expr`] supports) optionally followed by
//! `[AS] <name>` (the select list of a SQL job). The output column is named by the alias, else,
//! for a bare column, by that column's name; any other expression needs a name ("give the
//! expression a name: `<expr> AS <name>`"). Output names must be distinct. A column may be
//! selected more than once under different names. A bare column is passed on as it is (the
//! same Arrow array, not copied); an expression is evaluated over the whole batch. The output
//! columns have the expressions' types and no metadata role: a selected `offset` column is
//! plain data downstream.
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
use sqlparser::ast::{self, Spanned};

use crate::expr::{compile, parse_select_item, CompiledExpr, ExprError};
use crate::schema::{ColumnDef, DataType, Schema};
use crate::value::Row;

/// Where one output column comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// An input column, passed on (converted where [`Projection::by_name`] allows).
    Column(usize),
    /// A constant null (a metadata column only a source can fill).
    Null,
    /// A computed value.
    Expr(Box<CompiledExpr>),
}

/// A mapping from input rows to output rows, built against a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    sources: Vec<Source>,
    input: Schema,
    output: Schema,
    /// `output` as an Arrow schema (the batches [`Projection::apply_batch`] returns).
    arrow: SchemaRef,
}

impl Projection {
    /// Parses and compiles `select` items (`<expr> [AS <name>]`, see the module docs) against
    /// `input`. `field` is the path of the list in the spec (`sinks[0].select`); errors name
    /// the item (`sinks[0].select[1]`) and end with the position in its text when known.
    pub fn parse(field: &str, items: &[String], input: &Schema) -> Result<Projection> {
        crate::expr::with_deep_stack(|| Projection::parse_here(field, items, input))
    }

    fn parse_here(field: &str, items: &[String], input: &Schema) -> Result<Projection> {
        if items.is_empty() {
            return Err(KeelError::invalid_spec(field, "select at least one column"));
        }
        let mut sources = Vec::with_capacity(items.len());
        let mut columns: Vec<ColumnDef> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_field = format!("{field}[{i}]");
            let err = |e: ExprError| e.to_spec_error(&item_field);
            let (tree, alias) = parse_select_item(item).map_err(err)?;
            let expr = compile(&tree, input).map_err(err)?;
            let name = match (&alias, expr.column()) {
                (Some(a), _) => a.value.clone(),
                (None, Some(c))
                    if matches!(tree, ast::Expr::Identifier(_) | ast::Expr::CompoundIdentifier(_)) =>
                {
                    input.column(c).map_or_else(|| tree.to_string(), |col| col.name.clone())
                }
                _ => {
                    return Err(err(ExprError::new(
                        tree.span(),
                        format!("give the expression a name: `{tree} AS <name>`"),
                    )))
                }
            };
            if let Some(j) = columns.iter().position(|c| c.name == name) {
                return Err(err(ExprError::new(
                    alias.as_ref().map_or_else(|| tree.span(), |a| a.span),
                    format!("output column '{name}' is already selected by {field}[{j}]; rename one with AS"),
                )));
            }
            columns.push(ColumnDef::new(name, expr.data_type()));
            sources.push(match expr.column() {
                Some(c) => Source::Column(c),
                None => Source::Expr(Box::new(expr)),
            });
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
                    let from = input.column(j).map_or(c.data_type.clone(), |ic| ic.data_type.clone());
                    let fits = from == c.data_type
                        || matches!(
                            (&from, &c.data_type),
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
                    sources.push(Source::Column(j));
                }
                None if c.metadata.is_some_and(|k| !k.writable()) => sources.push(Source::Null),
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

    fn new(sources: Vec<Source>, input: &Schema, output: Schema) -> Projection {
        let arrow = crate::batch::arrow_schema(&output);
        Projection { sources, input: input.clone(), output, arrow }
    }

    /// The schema of the rows [`Projection::apply`] returns.
    pub fn output_schema(&self) -> &Schema {
        &self.output
    }

    /// The output batch: selected columns of `batch` shared, not copied; expressions
    /// evaluated over the whole batch; a constant null column where the input has none; an INT
    /// column headed for a BIGINT or DOUBLE one, or a BIGINT one for a DOUBLE one (see
    /// [`Projection::by_name`]) converted by a vectorized cast. Fails when an expression does
    /// (a division by zero, a CAST of a bad value).
    pub fn apply_batch(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.sources.len());
        for (field, src) in self.arrow.fields().iter().zip(&self.sources) {
            let column = match src {
                Source::Expr(e) => e.evaluate(batch)?,
                Source::Null => new_null_array(field.data_type(), rows),
                Source::Column(i) => match batch.columns().get(*i) {
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
                        (Some(a), _, ArrowType::Float64) => {
                            Arc::new(unary::<_, _, Float64Type>(a, f64::from))
                        }
                        (_, Some(a), ArrowType::Float64) => {
                            Arc::new(unary::<_, _, Float64Type>(a, |v| v as f64))
                        }
                        _ => {
                            return Err(KeelError::internal(format!(
                                "projection: column {} is {} in the batch, not {}",
                                field.name(),
                                c.data_type(),
                                field.data_type()
                            )))
                        }
                    },
                },
            };
            columns.push(column);
        }
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(self.arrow.clone(), columns, &options)
            .map_err(|e| KeelError::internal(format!("projection: {e}")))
    }

    /// The output row of `row` (tests, tools; the data path uses [`Projection::apply_batch`]).
    /// A row that does not fit the input schema, or on which an expression fails, gives a row
    /// of nulls.
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

    /// Bad items are refused with the item's field, the problem and its position (the texts
    /// changed with the SQL parser and now say where).
    #[test]
    fn select_errors_name_the_item() {
        for (list, want, needle) in [
            (
                vec!["id", "nme"],
                "sinks[0].select[1]",
                "unknown column `nme`; columns: id, name, age, off (at column 1)",
            ),
            (vec!["id", "age as id"], "sinks[0].select[1]", "already selected"),
            (
                vec!["id as"],
                "sinks[0].select[0]",
                "Expected: an identifier after AS, found: the end (at column 6)",
            ),
            (vec!["id, name"], "sinks[0].select[0]", "unexpected , after the select item (at column 3)"),
            (vec!["id to x"], "sinks[0].select[0]", "unexpected x after the select item (at column 7)"),
            (vec!["as"], "sinks[0].select[0]", "unknown column `as`"),
            (
                vec!["id", "age + 1"],
                "sinks[0].select[1]",
                "give the expression a name: `age + 1 AS <name>` (at column 1)",
            ),
            (
                vec!["UPPER(age) AS a"],
                "sinks[0].select[0]",
                "UPPER needs a STRING argument, found INT (at column 7)",
            ),
            (
                vec!["COUNT(*) AS n"],
                "sinks[0].select[0]",
                "aggregate function COUNT is not supported (at column 1)",
            ),
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

    /// Items are SQL expressions: computed columns take the expression's type and the alias
    /// as name; a bare column keeps the input's name (as declared, even when written in
    /// another case) and is the input's array itself, not a copy.
    #[test]
    fn select_computes_expressions_and_shares_bare_columns() -> std::result::Result<(), KeelError> {
        let p = Projection::parse(
            "sinks[0].select",
            &items(&[
                "ID",
                "UPPER(name) AS loud",
                "age * 2 + off AS x",
                "CAST(age AS STRING) s",
                "age > 18 AS adult",
            ]),
            &input(),
        )?;
        assert_eq!(
            p.output_schema().columns(),
            &[
                ColumnDef::new("id", DataType::Int),
                ColumnDef::new("loud", DataType::String),
                ColumnDef::new("x", DataType::BigInt),
                ColumnDef::new("s", DataType::String),
                ColumnDef::new("adult", DataType::Boolean),
            ]
        );
        assert_eq!(
            p.apply(sample()).values,
            vec![Value::Int(1), Value::from("ANN"), Value::Int(137), Value::from("30"), Value::Bool(true)]
        );
        let batch = crate::batch::batch_of_rows(&input(), &[sample(), sample()])
            .map_err(|(i, e)| KeelError::internal(format!("{i}: {e}")))?;
        let out = p.apply_batch(&batch)?;
        assert!(Arc::ptr_eq(out.column(0), batch.column(0)));
        assert_eq!(out.num_rows(), 2);
        Ok(())
    }
}
