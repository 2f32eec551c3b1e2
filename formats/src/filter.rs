//! [`Filter`]: keep the rows that satisfy every condition.
//!
//! One syntax, a string:
//!
//! ```yaml
//! filter: "age >= 18 and country = 'NL' and email is not null"
//! ```
//!
//! - a filter is one or more conditions joined by `and` (no `or`, no parentheses);
//! - a condition is `<column> <op> <literal>` with `<op>` one of `=`, `!=` (or `<>`), `<`, `<=`,
//!   `>`, `>=`, or `<column> is null` / `<column> is not null`;
//! - a column is a name of letters, digits and `_` not starting with a digit, or any name in
//!   backquotes (`` `order-id` ``); keywords (`and`, `is`, `not`, `null`, `true`, `false`) are
//!   case-insensitive;
//! - a literal is an integer (`18`, `-3`), a decimal (`2.5`, `1e3`), a string in single quotes
//!   (`'it''s'`), or `true` / `false`.
//!
//! Literals are checked against the column type when the filter is built: numbers for INT,
//! BIGINT and DOUBLE; strings for STRING; `true`/`false` for BOOLEAN (with `=` and `!=` only);
//! a timestamp string (`'2024-05-01 12:00:00'`, UTC) or epoch milliseconds for TIMESTAMP. BYTES
//! and MAP columns take only `is null` / `is not null`. As in SQL, a comparison with a null value
//! is not true, so `age != 18` drops rows whose age is null; so does a comparison involving NaN.

use std::fmt;
use std::sync::Arc;

use arrow_arith::arity::unary;
use arrow_arith::boolean::{and, is_not_null, is_null};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, Scalar, StringArray,
    TimestampMillisecondArray,
};
use arrow_ord::cmp;
use arrow_schema::{ArrowError, DataType as ArrowType};
use arrow_select::filter::filter_record_batch;
use keel_proto::{KeelError, Result};

use crate::schema::{DataType, Schema};
use crate::value::Row;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        })
    }
}

/// A literal, already converted to the column's type.
#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Int(i64),
    Double(f64),
    Str(String),
    Bool(bool),
    Timestamp(i64),
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    IsNull,
    IsNotNull,
    Compare(Op, Literal),
}

#[derive(Debug, Clone, PartialEq)]
struct Condition {
    column: usize,
    test: Test,
}

/// A conjunction of single-column conditions, built against a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    conditions: Vec<Condition>,
    /// The input's schema (for [`Filter::matches`] on a single row).
    schema: Schema,
}

// ----- lexer (shared with projection) -----

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Token {
    /// A bare name (may be a keyword).
    Word(String),
    /// A backquoted name (never a keyword).
    Quoted(String),
    Str(String),
    Number(String),
    Op(&'static str),
    Comma,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => write!(f, "'{w}'"),
            Token::Quoted(w) => write!(f, "`{w}`"),
            Token::Str(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Token::Number(n) => write!(f, "{n}"),
            Token::Op(o) => write!(f, "'{o}'"),
            Token::Comma => f.write_str("','"),
        }
    }
}

pub(crate) fn lex(text: &str) -> std::result::Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Word(chars[start..i].iter().collect()));
        } else if c == '`' || c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(if c == '`' {
                            format!("unterminated `name` starting with {s:?}")
                        } else {
                            format!("unterminated string '{s}")
                        })
                    }
                    Some(&q) if q == c => {
                        if chars.get(i + 1) == Some(&c) {
                            s.push(c);
                            i += 2;
                        } else {
                            i += 1;
                            break;
                        }
                    }
                    Some(&other) => {
                        s.push(other);
                        i += 1;
                    }
                }
            }
            if c == '`' {
                if s.is_empty() {
                    return Err("empty `` name".into());
                }
                out.push(Token::Quoted(s));
            } else {
                out.push(Token::Str(s));
            }
        } else if c.is_ascii_digit()
            || ((c == '-' || c == '+') && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < chars.len() {
                let d = chars[i];
                let exp_sign = (d == '-' || d == '+') && matches!(chars[i - 1], 'e' | 'E');
                if d.is_ascii_alphanumeric() || d == '.' || exp_sign {
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(Token::Number(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = match two.as_str() {
                "<=" => Some("<="),
                ">=" => Some(">="),
                "!=" => Some("!="),
                "<>" => Some("<>"),
                "==" => Some("=="),
                _ => None,
            };
            if let Some(op) = op {
                out.push(Token::Op(op));
                i += 2;
                continue;
            }
            match c {
                '=' => out.push(Token::Op("=")),
                '<' => out.push(Token::Op("<")),
                '>' => out.push(Token::Op(">")),
                ',' => out.push(Token::Comma),
                other => return Err(format!("unexpected character {other:?}")),
            }
            i += 1;
        }
    }
    Ok(out)
}

pub(crate) fn is_keyword(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.eq_ignore_ascii_case(word))
}

const KEYWORDS: &[&str] = &["and", "or", "is", "not", "null", "true", "false", "as"];

/// The column a token names, if it is a name (a bare keyword is not).
pub(crate) fn column_name(token: &Token) -> Option<&str> {
    match token {
        Token::Word(w) if !KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k)) => Some(w),
        Token::Quoted(w) => Some(w),
        _ => None,
    }
}

// ----- parser -----

impl Filter {
    /// Parses `text` (syntax in the module docs) against `schema`. `field` is the path of the
    /// filter in the spec (`sinks[0].filter`); every error names it.
    pub fn parse(field: &str, text: &str, schema: &Schema) -> Result<Filter> {
        let err = |reason: String| KeelError::invalid_spec(field, reason);
        let tokens = lex(text).map_err(err)?;
        if tokens.is_empty() {
            return Err(err("empty filter; write conditions like \"age >= 18 and name is not null\"".into()));
        }
        let mut conditions = Vec::new();
        let mut pos = 0;
        let ops_list = "=, !=, <, <=, >, >=, is null, is not null";
        loop {
            // Column.
            let tok = tokens.get(pos).ok_or_else(|| err("expected a column after 'and'".into()))?;
            let name = column_name(tok).ok_or_else(|| err(format!("expected a column name, found {tok}")))?;
            let column = schema
                .index_of(name)
                .ok_or_else(|| err(format!("unknown column '{name}'; columns: {}", schema.names())))?;
            let data_type = schema.column(column).map_or(DataType::String, |c| c.data_type.clone());
            pos += 1;
            // Operator.
            let tok = tokens
                .get(pos)
                .ok_or_else(|| err(format!("expected an operator ({ops_list}) after '{name}'")))?;
            let test = if is_keyword(tok, "is") {
                pos += 1;
                let negated = tokens.get(pos).is_some_and(|t| is_keyword(t, "not"));
                if negated {
                    pos += 1;
                }
                match tokens.get(pos) {
                    Some(t) if is_keyword(t, "null") => pos += 1,
                    other => {
                        return Err(err(format!(
                            "expected 'null' after '{name} is{}', found {}",
                            if negated { " not" } else { "" },
                            other.map_or("the end".to_string(), ToString::to_string)
                        )))
                    }
                }
                if negated {
                    Test::IsNotNull
                } else {
                    Test::IsNull
                }
            } else {
                let op = match tok {
                    Token::Op("=") | Token::Op("==") => Op::Eq,
                    Token::Op("!=") | Token::Op("<>") => Op::Ne,
                    Token::Op("<") => Op::Lt,
                    Token::Op("<=") => Op::Le,
                    Token::Op(">") => Op::Gt,
                    Token::Op(">=") => Op::Ge,
                    other => {
                        return Err(err(format!(
                            "expected an operator ({ops_list}) after '{name}', found {other}"
                        )))
                    }
                };
                pos += 1;
                let lit_tok =
                    tokens.get(pos).ok_or_else(|| err(format!("expected a value after '{name} {op}'")))?;
                pos += 1;
                let literal = literal(lit_tok, data_type.clone(), op)
                    .map_err(|reason| err(format!("'{name}' is {data_type}: {reason}")))?;
                Test::Compare(op, literal)
            };
            conditions.push(Condition { column, test });
            match tokens.get(pos) {
                None => break,
                Some(t) if is_keyword(t, "and") => pos += 1,
                Some(t) if is_keyword(t, "or") => {
                    return Err(err("only 'and' joins conditions; 'or' is not supported".into()))
                }
                Some(t) => {
                    return Err(err(format!("expected 'and' or the end after a condition, found {t}")))
                }
            }
        }
        Ok(Filter { conditions, schema: schema.clone() })
    }

    /// Which rows of `batch` (of the schema the filter was built against) satisfy every
    /// condition: one vectorized kernel per condition, combined with AND. A null in the mask
    /// means not kept.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let mut mask: Option<BooleanArray> = None;
        for c in &self.conditions {
            let column = batch.columns().get(c.column).ok_or_else(|| {
                KeelError::internal(format!("filter: the batch has no column {}", c.column))
            })?;
            let m = condition_mask(column, &c.test).map_err(arrow_error)?;
            mask = Some(match mask {
                None => m,
                Some(prev) => and(&prev, &m).map_err(arrow_error)?,
            });
        }
        Ok(mask.unwrap_or_else(|| BooleanArray::from(vec![true; batch.num_rows()])))
    }

    /// The rows of `batch` that satisfy every condition (the batch itself when all do).
    pub fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let mask = self.evaluate(batch)?;
        if mask.true_count() == batch.num_rows() {
            return Ok(batch.clone());
        }
        filter_record_batch(batch, &mask).map_err(arrow_error)
    }

    /// Whether `row` satisfies every condition (a row that does not fit the schema does not).
    pub fn matches(&self, row: &Row) -> bool {
        let Ok(batch) = crate::batch::batch_of_rows(&self.schema, std::slice::from_ref(row)) else {
            return false;
        };
        self.evaluate(&batch).is_ok_and(|m| m.len() == 1 && m.is_valid(0) && m.value(0))
    }

    /// The number of conditions.
    pub fn len(&self) -> usize {
        self.conditions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }
}

fn literal(tok: &Token, ty: DataType, op: Op) -> std::result::Result<Literal, String> {
    if is_keyword(tok, "null") {
        return Err("compare with null using 'is null' or 'is not null'".into());
    }
    match ty {
        DataType::Int | DataType::BigInt | DataType::Double => match tok {
            Token::Number(n) => {
                if ty != DataType::Double {
                    if let Ok(i) = n.parse::<i64>() {
                        return Ok(Literal::Int(i));
                    }
                }
                n.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(Literal::Double)
                    .ok_or_else(|| format!("{n} is not a number"))
            }
            other => Err(format!("compare it with a number, not {other}")),
        },
        DataType::String => match tok {
            Token::Str(s) => Ok(Literal::Str(s.clone())),
            other => Err(format!("compare it with a string in single quotes, not {other}")),
        },
        DataType::Boolean => {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err("a BOOLEAN takes only = and !=".into());
            }
            if is_keyword(tok, "true") {
                Ok(Literal::Bool(true))
            } else if is_keyword(tok, "false") {
                Ok(Literal::Bool(false))
            } else {
                Err(format!("compare it with true or false, not {tok}"))
            }
        }
        DataType::Timestamp => match tok {
            Token::Str(s) => crate::time::parse(s)
                .map(Literal::Timestamp)
                .ok_or_else(|| format!("'{s}' is not a timestamp like '2024-05-01 12:00:00'")),
            Token::Number(n) => {
                n.parse::<i64>().map(Literal::Timestamp).map_err(|_| format!("{n} is not epoch milliseconds"))
            }
            other => Err(format!("compare it with a timestamp string or epoch milliseconds, not {other}")),
        },
        DataType::Bytes | DataType::Map | DataType::Date | DataType::Decimal { .. } | DataType::Row(_) => {
            Err("it takes only 'is null' and 'is not null'".into())
        }
    }
}

fn arrow_error(e: ArrowError) -> KeelError {
    KeelError::internal(format!("filter: {e}"))
}

/// The mask of one condition over `column`.
fn condition_mask(column: &ArrayRef, test: &Test) -> std::result::Result<BooleanArray, ArrowError> {
    let (op, lit) = match test {
        Test::IsNull => return is_null(column),
        Test::IsNotNull => return is_not_null(column),
        Test::Compare(op, lit) => (*op, lit),
    };
    let Some((mut left, right)) = operands(column, lit) else {
        // A literal of another type never compares true (the parser does not build one).
        return Ok(BooleanArray::from(vec![false; column.len()]));
    };
    // Arrow orders doubles by IEEE total order, where -0.0 < +0.0; in SQL they are equal.
    if let Some(doubles) = left.as_primitive_opt::<Float64Type>() {
        if doubles.values().iter().any(|v| *v == 0.0 && v.is_sign_negative()) {
            left = Arc::new(unary::<_, _, Float64Type>(doubles, |v| v + 0.0));
        }
    }
    let right = Scalar::new(right);
    let mask = match op {
        Op::Eq => cmp::eq(&left, &right),
        Op::Ne => cmp::neq(&left, &right),
        Op::Lt => cmp::lt(&left, &right),
        Op::Le => cmp::lt_eq(&left, &right),
        Op::Gt => cmp::gt(&left, &right),
        Op::Ge => cmp::gt_eq(&left, &right),
    }?;
    // Arrow orders NaN above every number (and equal to itself); in SQL a comparison involving
    // NaN is not true.
    if let Some(doubles) = left.as_primitive_opt::<Float64Type>() {
        if doubles.values().iter().any(|v| v.is_nan()) {
            let not_nan = BooleanArray::from_unary(doubles, |v| !v.is_nan());
            return and(&mask, &not_nan);
        }
    }
    Ok(mask)
}

/// The column (cast where the literal needs a wider type) and the literal as a one-element
/// array of the same type.
fn operands(column: &ArrayRef, lit: &Literal) -> Option<(ArrayRef, ArrayRef)> {
    let to_f64 = |c: &ArrayRef| -> Option<ArrayRef> {
        if let Some(a) = c.as_primitive_opt::<Int32Type>() {
            return Some(Arc::new(unary::<_, _, Float64Type>(a, f64::from)));
        }
        c.as_primitive_opt::<Int64Type>()
            .map(|a| Arc::new(unary::<_, _, Float64Type>(a, |v| v as f64)) as ArrayRef)
    };
    let pair: (ArrayRef, ArrayRef) = match (column.data_type(), lit) {
        (ArrowType::Int32, Literal::Int(i)) => match i32::try_from(*i) {
            Ok(v) => (column.clone(), Arc::new(Int32Array::from(vec![v]))),
            Err(_) => {
                let wide = unary::<_, _, Int64Type>(column.as_primitive_opt::<Int32Type>()?, i64::from);
                (Arc::new(wide), Arc::new(Int64Array::from(vec![*i])))
            }
        },
        (ArrowType::Int64, Literal::Int(i)) => (column.clone(), Arc::new(Int64Array::from(vec![*i]))),
        (ArrowType::Int32 | ArrowType::Int64, Literal::Double(d)) => {
            (to_f64(column)?, Arc::new(Float64Array::from(vec![*d + 0.0])))
        }
        (ArrowType::Float64, Literal::Double(d)) => {
            (column.clone(), Arc::new(Float64Array::from(vec![*d + 0.0])))
        }
        (ArrowType::Float64, Literal::Int(i)) => {
            (column.clone(), Arc::new(Float64Array::from(vec![*i as f64])))
        }
        (ArrowType::Utf8, Literal::Str(s)) => (column.clone(), Arc::new(StringArray::from(vec![s.as_str()]))),
        (ArrowType::Boolean, Literal::Bool(b)) => (column.clone(), Arc::new(BooleanArray::from(vec![*b]))),
        (ArrowType::Timestamp(_, _), Literal::Timestamp(ms)) => {
            (column.clone(), Arc::new(TimestampMillisecondArray::from(vec![*ms])))
        }
        _ => return None,
    };
    Some(pair)
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

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let s = schema();
        for (f, needle) in [
            ("", "empty filter"),
            ("agee > 1", "unknown column 'agee'"),
            ("age", "expected an operator"),
            ("age >", "expected a value after 'age >'"),
            ("age > 'x'", "'age' is INT: compare it with a number"),
            ("name = 3", "'name' is STRING: compare it with a string"),
            ("active < true", "only = and !="),
            ("active = 1", "compare it with true or false"),
            ("ts > 'yesterday'", "not a timestamp"),
            ("blob = 'x'", "only 'is null'"),
            ("age = null", "using 'is null'"),
            ("age is nul", "expected 'null'"),
            ("age > 1 or age < 0", "'or' is not supported"),
            ("age > 1 age < 0", "expected 'and'"),
            ("age > 1 and", "expected a column after 'and'"),
            ("name = 'open", "unterminated string"),
            ("age ~ 3", "unexpected character '~'"),
            ("age > 12abc", "12abc is not a number"),
            ("and > 1", "expected a column name"),
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
}
