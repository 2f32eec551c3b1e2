//! [`Filter`]: keep the rows for which a SQL condition is TRUE.
//!
//! ```yaml
//! filter: "age >= 18 AND country = 'NL' AND email IS NOT NULL"
//! ```
//!
//! The filter is one SQL expression of type BOOLEAN (the WHERE clause of a SQL job), with
//! everything [`crate::expr`] supports: comparisons, `AND` / `OR` / `NOT` and parentheses,
//! `IS [NOT] NULL`, `BETWEEN`, `IN`, `LIKE`, CASE, arithmetic, CAST, the string functions and
//! JSON_VALUE. Keywords are case-insensitive; a column is a name, bare or in backquotes
//! (`` `order-id` ``); strings are in single quotes (`'it''s'`).
//!
//! A row is kept when the condition is TRUE: as in SQL, a comparison with a null value is not
//! true, so `age <> 18` drops rows whose age is null; so does a comparison involving NaN.
//! A string literal compared with a TIMESTAMP column is read as a timestamp
//! (`'2024-05-01 12:00:00'`, UTC), an integer as epoch milliseconds.
//!
//! Errors name the spec field and say where in the text the problem is
//! (`sinks[0].filter: unknown column `agee`; columns: ... (at column 1)`).

use arrow_array::cast::AsArray;
use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_select::filter::{filter_record_batch, prep_null_mask_filter};
use keel_proto::{KeelError, Result};
use sqlparser::ast::{self, BinaryOperator, Spanned};

use crate::expr::{compile, parse_expr, CompiledExpr, ExprError};
use crate::schema::{DataType, Schema};
use crate::value::Row;

/// A compiled BOOLEAN condition on the rows of a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    condition: CompiledExpr,
    /// The number of conditions joined by a top-level AND.
    conjuncts: usize,
    /// The input's schema (for [`Filter::matches`] on a single row).
    schema: Schema,
}

/// The number of conditions joined by AND at the top (without recursion: a chain of ANDs can
/// be as deep as it is long).
fn conjuncts(e: &ast::Expr) -> usize {
    let mut count = 0;
    let mut todo = vec![e];
    while let Some(e) = todo.pop() {
        match e {
            ast::Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
                todo.push(left);
                todo.push(right);
            }
            ast::Expr::Nested(inner) => todo.push(inner),
            _ => count += 1,
        }
    }
    count
}

impl Filter {
    /// Parses and compiles `text` (a SQL condition, see the module docs) against `schema`.
    /// `field` is the path of the filter in the spec (`sinks[0].filter`); every error names
    /// it, and its reason ends with the position in `text` when known (` (at column 5)`).
    pub fn parse(field: &str, text: &str, schema: &Schema) -> Result<Filter> {
        crate::expr::with_deep_stack(|| Filter::parse_here(field, text, schema))
    }

    fn parse_here(field: &str, text: &str, schema: &Schema) -> Result<Filter> {
        let err = |e: ExprError| e.to_spec_error(field);
        if text.trim().is_empty() {
            return Err(KeelError::invalid_spec(
                field,
                "empty filter; write a condition like \"age >= 18 AND name IS NOT NULL\"",
            ));
        }
        let tree = parse_expr(text).map_err(err)?;
        let condition = compile(&tree, schema).map_err(err)?;
        if condition.data_type() != DataType::Boolean {
            return Err(err(ExprError::new(
                tree.span(),
                format!(
                    "the filter is {}, not a condition (BOOLEAN); write a comparison like \"age >= 18\"",
                    condition.data_type()
                ),
            )));
        }
        Ok(Filter { conjuncts: conjuncts(&tree), condition, schema: schema.clone() })
    }

    /// Which rows of `batch` (of the schema the filter was built against) are kept: true where
    /// the condition is TRUE, false where it is FALSE or NULL (the mask has no nulls). Fails
    /// when the condition does (a division by zero, a CAST of a bad value).
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let values = self.condition.evaluate(batch)?;
        let mask = values
            .as_boolean_opt()
            .ok_or_else(|| KeelError::internal("filter: the condition is not BOOLEAN"))?;
        Ok(if mask.null_count() == 0 { mask.clone() } else { prep_null_mask_filter(mask) })
    }

    /// The rows of `batch` that are kept (the batch itself when all are).
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let mask = self.evaluate(batch)?;
        if mask.true_count() == batch.num_rows() {
            return Ok(batch.clone());
        }
        filter_record_batch(batch, &mask).map_err(|e| KeelError::internal(format!("filter: {e}")))
    }

    /// Whether `row` is kept (a row that does not fit the schema, or on which the condition
    /// fails, is not).
    pub fn matches(&self, row: &Row) -> bool {
        let Ok(batch) = crate::batch::batch_of_rows(&self.schema, std::slice::from_ref(row)) else {
            return false;
        };
        self.evaluate(&batch).is_ok_and(|m| m.len() == 1 && m.is_valid(0) && m.value(0))
    }

    /// The number of conditions joined by AND at the top (parentheses around ANDs do not
    /// count; 1 for any other condition).
    pub fn len(&self) -> usize {
        self.conjuncts
    }

    /// Always false: a filter has at least one condition.
    pub fn is_empty(&self) -> bool {
        self.conjuncts == 0
    }

    /// The compiled condition.
    pub fn condition(&self) -> &CompiledExpr {
        &self.condition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColumnDef, MetadataKey};
    use crate::value::Value;

    fn schema() -> Schema {
        Schema::from_columns(
            "c",
            &[
                ColumnDef::new("id", DataType::BigInt),
                ColumnDef::new("name", DataType::String),
                ColumnDef::new("age", DataType::Int),
                ColumnDef::new("score", DataType::Double),
                ColumnDef::new("active", DataType::Boolean),
                ColumnDef::metadata("ts", DataType::Timestamp, MetadataKey::Timestamp),
                ColumnDef::new("order-id", DataType::String),
                ColumnDef::new("blob", DataType::Bytes),
            ],
        )
        .expect("schema")
    }

    fn row(id: i64, name: Option<&str>, age: Option<i64>, score: f64, active: bool, ts: i64) -> Row {
        Row::new(vec![
            Value::Int(id),
            name.into(),
            age.into(),
            Value::Double(score),
            Value::Bool(active),
            Value::Timestamp(ts),
            Value::from("o-1"),
            Value::Null,
        ])
    }

    fn keeps(filter: &str, r: &Row) -> bool {
        Filter::parse("sinks[0].filter", filter, &schema()).expect(filter).matches(r)
    }

    /// -0.0 equals 0 as in SQL (Arrow's total order puts it below +0.0): a -0.0 value and a
    /// `-0.0` literal compare like 0.
    #[test]
    fn negative_zero_compares_equal_to_zero() {
        let r = row(1, Some("a"), Some(1), -0.0, true, 0);
        assert!(keeps("score = 0", &r));
        assert!(keeps("score >= 0", &r));
        assert!(!keeps("score < 0", &r));
        let zero = row(1, Some("a"), Some(0), 0.0, true, 0);
        assert!(keeps("score = -0.0", &zero));
        assert!(keeps("age = -0.0", &zero));
        assert!(!keeps("score > -0.0", &zero));
    }

    #[test]
    fn each_operator_compares_as_documented() {
        let r = row(1, Some("ann"), Some(18), 2.5, true, 1_714_564_800_000);
        for (f, want) in [
            ("age >= 18", true),
            ("age > 18", false),
            ("age = 18", true),
            ("age == 18", true),
            ("age != 18", false),
            ("age <> 17", true),
            ("age < 18.5", true),
            ("age <= 17", false),
            ("score > 2", true),
            ("score = 2.5", true),
            ("score < -1e3", false),
            ("name = 'ann'", true),
            ("name > 'amy'", true),
            ("name != 'ann'", false),
            ("active = true", true),
            ("active != TRUE", false),
            ("ts = '2024-05-01 12:00:00'", true),
            ("ts >= '2024-05-01T12:00:00Z'", true),
            ("ts < 1714564800000", false),
            ("`order-id` = 'o-1'", true),
            ("blob is null", true),
            ("blob IS NOT NULL", false),
            ("id = -1", false),
        ] {
            assert_eq!(keeps(f, &r), want, "{f}");
        }
    }

    #[test]
    fn conditions_joined_by_and_must_all_hold() {
        let f = "age >= 18 AND name is not null and score < 10";
        assert!(keeps(f, &row(1, Some("a"), Some(30), 1.0, true, 0)));
        assert!(!keeps(f, &row(1, None, Some(30), 1.0, true, 0)));
        assert!(!keeps(f, &row(1, Some("a"), Some(10), 1.0, true, 0)));
        assert_eq!(Filter::parse("f", f, &schema()).expect("ok").len(), 3);
    }

    #[test]
    fn comparisons_with_null_or_nan_are_not_true() {
        let r = row(1, None, None, f64::NAN, false, 0);
        for f in ["age = 1", "age != 1", "age < 1", "name != 'x'", "score != 1", "score = 1"] {
            assert!(!keeps(f, &r), "{f}");
        }
        assert!(keeps("age is null and name is null", &r));
    }

    #[test]
    fn parsing_arbitrary_text_never_panics() {
        let s = schema();
        let pieces = [
            "age",
            "name",
            "`order-id`",
            "`",
            "'",
            "''",
            "=",
            "!=",
            "<>",
            "<",
            ">=",
            "is",
            "not",
            "null",
            "and",
            "or",
            "-",
            "1e",
            "1e-3",
            "-7",
            "true",
            "é",
            " ",
            ",",
            "(",
            "ts",
            "'2024-05-01'",
            "\\",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            let mut text = String::new();
            for _ in 0..(seed % 7) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(pieces[(seed % pieces.len() as u64) as usize]);
                if seed & 1 == 0 {
                    text.push(' ');
                }
            }
            seed = seed.wrapping_add(0x9e37_79b9);
            if let Ok(f) = Filter::parse("f", &text, &s) {
                let _ = f.matches(&Row::nulls(2));
            }
        }
    }

    #[test]
    fn string_literals_take_doubled_quotes_and_keep_spaces() {
        let r = row(1, Some("it's  here"), Some(1), 0.0, true, 0);
        assert!(keeps("name = 'it''s  here'", &r));
    }

    /// Every kind of bad filter is refused with the spec field, a reason naming the problem,
    /// and the position in the text (the expected texts changed with the SQL parser; each is
    /// at least as precise as before and now says where).
    #[test]
    fn errors_name_the_field_and_the_problem() {
        let s = schema();
        for (f, needle) in [
            ("", "empty filter"),
            ("  ", "empty filter"),
            ("agee > 1", "unknown column `agee`; columns: id, name, age, score, active, ts, order-id, blob (at column 1)"),
            ("age", "the filter is INT, not a condition (BOOLEAN)"),
            ("age >", "Expected: an expression, found: the end (at column 6)"),
            ("age > 'x'", "cannot compare INT with STRING (at column 1)"),
            ("name = 3", "cannot compare STRING with INT"),
            ("active < true", "BOOLEAN compares with = and <> only"),
            ("active = 1", "cannot compare BOOLEAN with INT"),
            ("ts > 'yesterday'", "'yesterday' is not a timestamp like '2024-05-01 12:00:00'"),
            ("blob = 'x'", "cannot compare BYTES with STRING"),
            ("age = null", "use IS NULL or IS NOT NULL"),
            ("age is nul", "found: nul (at column 8)"),
            ("age > 1 age < 0", "unexpected age after the expression (at column 9)"),
            ("age > 1 and", "found: the end (at column 12)"),
            ("name = 'open", "Unterminated string literal (at column 8)"),
            ("age ~ 3", "operator ~ is not supported"),
            ("age > 12abc", "unexpected abc after the expression (at column 9)"),
            ("sum(age) > 1", "aggregate function SUM is not supported (at column 1)"),
            ("foo(age) > 1", "unknown function FOO (at column 1)"),
            ("age IN (SELECT 1)", "subqueries (IN (SELECT ...)) are not supported (at column 1)"),
            ("age > 1 AND\n  nme = 'x'", "unknown column `nme`; columns: id, name, age, score, active, ts, order-id, blob (at line 2, column 3)"),
        ] {
            match Filter::parse("sinks[0].filter", f, &s) {
                Err(KeelError::InvalidSpec { field, reason }) => {
                    assert_eq!(field, "sinks[0].filter");
                    assert!(reason.contains(needle), "{f}: {reason}");
                }
                other => panic!("{f}: expected an error, got {other:?}"),
            }
        }
    }

    /// A filter is any BOOLEAN SQL condition: OR, parentheses, NOT, IN, LIKE, CASE and
    /// functions work, and `len` counts the top-level AND conditions.
    #[test]
    fn any_sql_condition_filters() -> std::result::Result<(), KeelError> {
        let adult = row(1, Some("ann"), Some(30), 2.5, true, 0);
        let child = row(2, Some("Bob"), Some(10), 9.0, false, 0);
        for (f, want_adult, want_child) in [
            ("age >= 18 OR name = 'Bob'", true, true),
            ("(age >= 18 OR score > 5) AND NOT active", false, true),
            ("name IN ('ann', 'zed')", true, false),
            ("UPPER(name) LIKE 'B%'", false, true),
            ("CASE WHEN active THEN age > 20 ELSE score > 100 END", true, false),
            ("age BETWEEN 5 AND 15", false, true),
            ("CHAR_LENGTH(`order-id`) = 3", true, true),
        ] {
            assert_eq!(keeps(f, &adult), want_adult, "{f}");
            assert_eq!(keeps(f, &child), want_child, "{f}");
        }
        assert!(Filter::parse("f", "a_b OR c", &schema()).is_err());
        assert_eq!(Filter::parse("f", "age > 1 OR age < 0", &schema())?.len(), 1);
        assert_eq!(Filter::parse("f", "(age > 1 AND age < 9) AND id = 1", &schema())?.len(), 3);
        Ok(())
    }

    /// The mask has no nulls (a NULL condition is not kept), and a condition that fails on a
    /// row (integer division by zero) fails the batch instead of dropping or keeping it.
    #[test]
    fn evaluate_gives_a_null_free_mask_and_reports_failures() -> std::result::Result<(), KeelError> {
        let s = schema();
        let rows = [row(1, Some("a"), Some(30), 1.0, true, 0), row(2, Some("b"), None, 1.0, true, 0)];
        let batch = crate::batch::batch_of_rows(&s, &rows)
            .map_err(|(i, e)| KeelError::internal(format!("{i}: {e}")))?;
        let mask = Filter::parse("f", "age > 18", &s)?.evaluate(&batch)?;
        assert_eq!(mask.null_count(), 0);
        assert_eq!(mask, BooleanArray::from(vec![true, false]));
        assert_eq!(Filter::parse("f", "age > 18", &s)?.apply(&batch)?.num_rows(), 1);
        let failing = Filter::parse("f", "100 / (age - 30) > 1", &s)?;
        match failing.apply(&batch) {
            Err(e) => assert!(e.to_string().contains("division by zero in `100 / (age - 30)`"), "{e}"),
            Ok(b) => panic!("kept {} rows", b.num_rows()),
        }
        Ok(())
    }
}
