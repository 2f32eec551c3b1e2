//! SQL expressions, parsed by sqlparser and compiled to Arrow kernels.
//!
//! A sink's `filter:` and `select:` items (and the WHERE clause and select list of a SQL
//! job) are SQL expressions. [`parse_expr`] / [`parse_select_item`] parse the text with
//! [`FlinkDialect`]; [`compile`] checks the tree against the input [`Schema`] and gives a
//! [`CompiledExpr`] with a result type, which [`CompiledExpr::evaluate`] runs over a whole
//! batch at a time (one kernel per operator, never a loop that allocates per row, except
//! JSON_VALUE which parses each row's JSON).
//!
//! Every error is an [`ExprError`] naming the construct, with its span in the text.
//!
//! # What is supported
//!
//! Types are Keel's: INT, BIGINT, DOUBLE, STRING, BOOLEAN, TIMESTAMP (milliseconds, UTC),
//! BYTES, MAP (headers; only `IS [NOT] NULL`, CAST to nothing).
//!
//! - **Columns**: a name, bare or in backquotes (`` `order-id` ``). The exact name first,
//!   else the one column whose name differs only in case; otherwise
//!   "unknown column `x`; columns: a, b, c". A dotted name (`a.b`) is a column named `a.b`
//!   if there is one, else field `b` of the ROW column `a` (`a.b.c` for nested rows; exact
//!   field name first, else the one that differs only in case); a field of a null row is null.
//! - **Literals**: integers (INT if they fit in 32 bits, else BIGINT; beyond 64 bits an
//!   error), decimals and exponents (DOUBLE), `'strings'` (`''` is a quote), `TRUE` / `FALSE`,
//!   `TIMESTAMP '2024-05-01 12:00:00'`, `NULL` (it takes the type its context gives it; a
//!   whole expression that is only NULL is refused: write `CAST(NULL AS <type>)`).
//! - **CAST(x AS type)** and **TRY_CAST**: the types of [`sql_type`]. Conversions are Arrow's
//!   (arrow-cast), except STRING <-> TIMESTAMP, which use Keel's timestamp text
//!   (`2024-05-01 12:00:00.000`, reading the forms [`crate::parse_timestamp`] reads). A value
//!   that does not convert fails the batch with an error naming the value (as Flink fails
//!   the job); TRY_CAST gives NULL instead. A CAST of a constant is done once, when compiled
//!   (a bad constant is a compile error). MAP casts are refused.
//! - **Arithmetic** `+ - * / %` and unary minus on numbers, with promotion INT < BIGINT <
//!   DOUBLE. Integers wrap on overflow (as Java does); integer `/` truncates (`7 / 2` = 3);
//!   integer division or `%` by zero fails the batch with "division by zero in `a / b`"
//!   (Flink fails too), DOUBLE division by zero gives an infinity or NaN. A null operand
//!   gives null.
//! - **Comparisons** `= <> != < <= > >=`: numbers promote; a string literal compared with a
//!   TIMESTAMP is parsed as a timestamp (UTC), an integer literal as epoch milliseconds;
//!   BOOLEAN takes `=` and `<>` only; other mixes are "cannot compare STRING with INT". A
//!   comparison with null is null (not true); one involving NaN is false; -0.0 = 0.
//! - **Logic** `AND`, `OR`, `NOT` with SQL's three-valued logic; `IS [NOT] NULL`,
//!   `IS [NOT] TRUE`, `IS [NOT] FALSE`, `IS [NOT] UNKNOWN`; `x [NOT] BETWEEN a AND b`
//!   (`x >= a AND x <= b`); `x [NOT] IN (v1, v2, ...)` (`x = v1 OR x = v2 ...`, so a null in
//!   the list makes a miss null); `s [NOT] LIKE pattern [ESCAPE 'c']` with `%` and `_`
//!   (Arrow's LIKE; a literal pattern is rewritten so `\` is an ordinary character unless it
//!   is the ESCAPE character; ESCAPE needs a literal pattern).
//! - **Conditionals**: `CASE WHEN c THEN r ... [ELSE e] END` and `CASE x WHEN v THEN r ...
//!   END` (no ELSE gives null; results promote like numbers), `COALESCE(a, b, ...)`,
//!   `NULLIF(a, b)`, `IF(c, a, b)`. A branch is checked for errors (division by zero, a failed
//!   CAST) only on the rows it is taken for, and so is the right side of `AND` / `OR` where
//!   the left side does not decide: `b <> 0 AND a / b > 1` never fails.
//! - **Strings**: `UPPER`, `LOWER` (Unicode), `CONCAT(a, ...)` and `a || b` (null if any
//!   argument is null, as in Flink), `SUBSTRING(s FROM i [FOR n])` and `SUBSTRING(s, i [, n])`
//!   / `SUBSTR` (1-based characters; 0 counts as 1, a negative start counts from the end, a
//!   negative length gives ''), `TRIM([BOTH | LEADING | TRAILING] [chars] FROM s)` and
//!   `TRIM(s)` (spaces by default; `chars` is a set of characters), `CHAR_LENGTH` /
//!   `CHARACTER_LENGTH` (characters, INT). The string functions take STRING arguments.
//! - **JSON_VALUE(json, path)** -> STRING: the path is a literal `$` followed by `.key`,
//!   `['key']` / `["key"]` and `[index]` steps (an optional `lax ` prefix). Null when the
//!   input is null or not valid JSON, the path is missing, or the value is an object, an array
//!   or JSON null; a string is returned unquoted, a number or boolean as its JSON text.
//!
//! # What is refused (with the construct's name and position)
//!
//! Subqueries (`(SELECT ...)`, `IN (SELECT ...)`, `EXISTS`), aggregate functions ("aggregate
//! function SUM is not supported"), window functions (`OVER`, ROW_NUMBER, LAG, ...), unknown
//! functions ("unknown function FOO"), and every other construct ("`x` is not supported",
//! e.g. INTERVAL, EXTRACT, ILIKE, `(expr).field`).
//!
//! # Errors and limits
//!
//! An [`ExprError`] displays as its reason followed by ` (at column N)` (or ` (at line L,
//! column N)` past the first line) when the position is known: sqlparser's syntax errors keep
//! their line and column, a missing end (`age >`) points after the text, and a compile error
//! points at the construct (sqlparser's span coverage is partial: a CAST points at its operand,
//! a binary operator at its left operand). Errors during evaluation (division by zero, a CAST
//! of a bad value) are [`keel_proto::KeelError::FailedPrecondition`] naming the expression.
//!
//! A text is at most [`MAX_TEXT`] bytes, and an expression at most 500 levels deep (a chain
//! `a + b + c ...` is as deep as it is long; chains of AND or OR and IN lists do not count,
//! they are compiled as balanced trees). Parsing and compiling run on a grown stack
//! ([`with_deep_stack`]) because sqlparser's spans, display and drop recurse as deep as the
//! tree; evaluation grows its stack as needed, so no expression overflows a thread's stack.

mod compile;
mod dialect;
mod eval;
mod parse;
#[cfg(test)]
mod tests;

use arrow_array::{ArrayRef, RecordBatch};
use sqlparser::ast::{self, Spanned};

pub use dialect::FlinkDialect;
pub use parse::{parse_expr, parse_select_item, sql_type, ExprError, MAX_TEXT};

use crate::schema::{DataType, Schema};
use compile::{Compiler, Node, Typed};

/// An expression compiled against a schema: typed, ready to evaluate over batches of that
/// schema.
#[derive(Debug, Clone)]
pub struct CompiledExpr {
    root: Typed,
    ty: DataType,
    /// The expression as SQL text (sqlparser's rendering).
    text: String,
}

impl PartialEq for CompiledExpr {
    fn eq(&self, other: &Self) -> bool {
        self.ty == other.ty && self.text == other.text
    }
}

/// When less stack than this is left, a recursive step continues on a new segment.
const RED_ZONE: usize = 128 * 1024;
/// The size of such a segment.
const SEGMENT: usize = 2 * 1024 * 1024;

/// Runs `f` on a stack with room for a deep syntax tree: sqlparser's spans, display, clone
/// and drop of an expression recurse as deep as the tree (a chain `a + b + c ...` is as deep
/// as it is long). Used around parsing and compiling; the statement parser can use it too.
pub fn with_deep_stack<T>(f: impl FnOnce() -> T) -> T {
    // Reserved, not committed: only the pages a deep tree touches are used.
    stacker::maybe_grow(32 * 1024 * 1024, 256 * 1024 * 1024, f)
}

/// Compiles `expr` against `schema` (the columns of the batches it will be evaluated on).
pub fn compile(expr: &ast::Expr, schema: &Schema) -> Result<CompiledExpr, ExprError> {
    with_deep_stack(|| {
        let compiler = Compiler { schema, depth: std::cell::Cell::new(0) };
        let span = expr.span();
        let root = compiler.compile(expr, span)?;
        let Some(ty) = root.ty.clone() else {
            return Err(ExprError::new(
                span,
                "the expression is always NULL and has no type; write CAST(NULL AS <type>)",
            ));
        };
        Ok(CompiledExpr { root, ty, text: expr.to_string() })
    })
}

impl CompiledExpr {
    /// The type of the values [`CompiledExpr::evaluate`] returns.
    pub fn data_type(&self) -> DataType {
        self.ty.clone()
    }

    /// The expression as SQL text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The input column it is, when it is a bare column reference.
    pub fn column(&self) -> Option<usize> {
        match self.root.node {
            Node::Column(i) => Some(i),
            _ => None,
        }
    }

    /// Its value for every row of `batch` (whose columns are the schema's, in order): an
    /// array of [`crate::batch::arrow_type`] of [`CompiledExpr::data_type`], one value per row.
    /// Fails on a division by zero or a CAST that does not convert (see the module docs).
    pub fn evaluate(&self, batch: &RecordBatch) -> keel_proto::Result<ArrayRef> {
        let ctx = eval::Ctx::new(batch);
        eval::eval(&self.root, &ctx)?.into_array(batch.num_rows())
    }
}
