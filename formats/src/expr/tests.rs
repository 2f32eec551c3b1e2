//! Tests of the expression engine: each construct over a small batch with nulls, and the
//! errors (message and position).

use std::error::Error;
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BinaryArray, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};

use super::*;
use crate::batch::{arrow_schema, value_at};
use crate::schema::ColumnDef;
use crate::value::Value;

type TestResult = Result<(), Box<dyn Error>>;

const NOON: i64 = 1_714_564_800_000; // 2024-05-01 12:00:00 UTC

fn schema() -> Result<Schema, keel_proto::KeelError> {
    Schema::from_columns(
        "columns",
        &[
            ColumnDef::new("id", DataType::BigInt),
            ColumnDef::new("name", DataType::String),
            ColumnDef::new("age", DataType::Int),
            ColumnDef::new("score", DataType::Double),
            ColumnDef::new("active", DataType::Boolean),
            ColumnDef::new("ts", DataType::Timestamp),
            ColumnDef::new("j", DataType::String),
            ColumnDef::new("blob", DataType::Bytes),
            ColumnDef::new("Mixed", DataType::Int),
        ],
    )
}

const DOC: &str = r#"{"a":{"b":"x","n":1.5,"t":true,"o":{},"l":[1,2],"z":null},"arr":[10,20],"a b":"sp"}"#;

/// Four rows; row 1 (0-based) is mostly null, with NaN for the score.
fn batch() -> Result<RecordBatch, Box<dyn Error>> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
        Arc::new(StringArray::from(vec![Some("ann"), None, Some("Bob"), Some("it's")])),
        Arc::new(Int32Array::from(vec![Some(30), None, Some(17), Some(0)])),
        Arc::new(Float64Array::from(vec![Some(2.5), Some(f64::NAN), Some(-0.0), None])),
        Arc::new(BooleanArray::from(vec![Some(true), Some(false), None, Some(true)])),
        Arc::new(TimestampMillisecondArray::from(vec![Some(NOON), None, Some(0), Some(NOON + 1)])),
        Arc::new(StringArray::from(vec![Some(DOC), Some("not json"), None, Some(r#"{"a":null}"#)])),
        Arc::new(BinaryArray::from(vec![Some(&b"x"[..]), None, Some(&b""[..]), Some(&b"y"[..])])),
        Arc::new(Int32Array::from(vec![7, 7, 7, 7])),
    ];
    Ok(RecordBatch::try_new(arrow_schema(&schema()?), columns)?)
}

fn compiled(text: &str) -> Result<CompiledExpr, Box<dyn Error>> {
    let tree = parse_expr(text).map_err(|e| format!("{text}: {e}"))?;
    Ok(compile(&tree, &schema()?).map_err(|e| format!("{text}: {e}"))?)
}

/// The type and the four values of `text` over [`batch`].
fn run(text: &str) -> Result<(DataType, Vec<Value>), Box<dyn Error>> {
    let e = compiled(text)?;
    let out = e.evaluate(&batch()?)?;
    if out.len() != 4 {
        return Err(format!("{text}: {} values", out.len()).into());
    }
    if out.data_type() != &crate::batch::arrow_type(&e.data_type()) {
        return Err(format!("{text}: Arrow type {} for {}", out.data_type(), e.data_type()).into());
    }
    Ok((e.data_type(), (0..out.len()).map(|i| value_at(out.as_ref(), i)).collect()))
}

fn check(text: &str, ty: DataType, want: &[Value]) -> TestResult {
    let (t, got) = run(text)?;
    assert_eq!(t, ty, "type of {text}");
    assert_eq!(got, want, "{text}");
    Ok(())
}

/// The compile-time error of `text`, as displayed (reason and position).
fn compile_error(text: &str) -> Result<String, Box<dyn Error>> {
    let tree = match parse_expr(text) {
        Ok(t) => t,
        Err(e) => return Ok(e.to_string()),
    };
    match compile(&tree, &schema()?) {
        Ok(_) => Err(format!("{text}: compiled").into()),
        Err(e) => Ok(e.to_string()),
    }
}

/// The evaluation error of `text` over [`batch`].
fn eval_error(text: &str) -> Result<String, Box<dyn Error>> {
    match compiled(text)?.evaluate(&batch()?) {
        Ok(v) => Err(format!("{text}: evaluated to {v:?}").into()),
        Err(e) => Ok(e.to_string()),
    }
}

use Value::Null;

fn i(v: i64) -> Value {
    Value::Int(v)
}
fn d(v: f64) -> Value {
    Value::Double(v)
}
fn b(v: bool) -> Value {
    Value::Bool(v)
}
fn s(v: &str) -> Value {
    Value::String(v.into())
}

/// Literals get the documented types: INT when it fits, else BIGINT; DOUBLE for decimals
/// and exponents; '' inside a string is a quote; TIMESTAMP '...' is UTC milliseconds.
#[test]
fn literals_are_typed() -> TestResult {
    check("1", DataType::Int, &[i(1), i(1), i(1), i(1)])?;
    check("-2147483648", DataType::Int, &vec![i(-2147483648); 4])?;
    check("3000000000", DataType::BigInt, &vec![i(3_000_000_000); 4])?;
    check("2.5", DataType::Double, &vec![d(2.5); 4])?;
    check("-1e3", DataType::Double, &vec![d(-1000.0); 4])?;
    check("'it''s'", DataType::String, &[s("it's"), s("it's"), s("it's"), s("it's")])?;
    check("TRUE", DataType::Boolean, &vec![b(true); 4])?;
    check("TIMESTAMP '2024-05-01 12:00:00'", DataType::Timestamp, &vec![Value::Timestamp(NOON); 4])?;
    check("CAST(NULL AS INT)", DataType::Int, &[Null, Null, Null, Null])?;
    assert_eq!(
        compile_error("99999999999999999999")?,
        "integer 99999999999999999999 is out of range for BIGINT (at column 1)"
    );
    assert_eq!(
        compile_error("NULL")?,
        "the expression is always NULL and has no type; write CAST(NULL AS <type>) (at column 1)"
    );
    assert_eq!(
        compile_error("TIMESTAMP 'soon'")?,
        "`TIMESTAMP 'soon'`: 'soon' is not a valid TIMESTAMP (at column 11)"
    );
    Ok(())
}

/// Columns are found by exact name first, then by a unique case-insensitive match; a bare
/// column evaluates to the batch's own array (no copy).
#[test]
fn column_references_resolve_case_insensitively_and_share_the_array() -> TestResult {
    check("AGE", DataType::Int, &[i(30), Null, i(17), i(0)])?;
    check("`name`", DataType::String, &[s("ann"), Null, s("Bob"), s("it's")])?;
    check("mixed", DataType::Int, &vec![i(7); 4])?;
    let e = compiled("age")?;
    assert_eq!(e.column(), Some(2));
    let b = batch()?;
    assert!(Arc::ptr_eq(&e.evaluate(&b)?, b.column(2)));
    assert_eq!(
        compile_error("agee + 1")?,
        "unknown column `agee`; columns: id, name, age, score, active, ts, j, blob, Mixed (at column 1)"
    );
    assert_eq!(
        compile_error("1 + t.age")?,
        format!("unknown column `t.age`; columns: {} (at column 5)", schema()?.names())
    );
    Ok(())
}

/// Arithmetic promotes INT < BIGINT < DOUBLE, propagates nulls, truncates integer division,
/// and wraps on integer overflow.
#[test]
fn arithmetic_promotes_and_propagates_nulls() -> TestResult {
    check("age + 1", DataType::Int, &[i(31), Null, i(18), i(1)])?;
    check("age + id", DataType::BigInt, &[i(31), Null, i(20), i(4)])?;
    check("age * 1.5", DataType::Double, &[d(45.0), Null, d(25.5), d(0.0)])?;
    check("age / 2", DataType::Int, &[i(15), Null, i(8), i(0)])?;
    check("age % 7", DataType::Int, &[i(2), Null, i(3), i(0)])?;
    check("-age", DataType::Int, &[i(-30), Null, i(-17), i(0)])?;
    check("id - 2 * 3", DataType::BigInt, &[i(-5), i(-4), i(-3), i(-2)])?;
    check("(id + 1) * 2", DataType::BigInt, &[i(4), i(6), i(8), i(10)])?;
    check("2147483647 + mixed", DataType::Int, &vec![i(-2147483642); 4])?;
    check("age + NULL", DataType::Int, &[Null, Null, Null, Null])?;
    let (_, v) = run("score / 0")?;
    assert_eq!(v[0], d(f64::INFINITY));
    assert_eq!(compile_error("name + 1")?, "operator + needs numbers, found STRING and INT (at column 1)");
    assert_eq!(compile_error("-name")?, "unary - needs a number, found STRING (at column 2)");
    Ok(())
}

/// Integer division by zero fails the batch naming the expression, but only where it counts:
/// not on rows a CASE branch is not taken for, nor where AND / OR is already decided.
#[test]
fn integer_division_by_zero_fails_only_where_it_counts() -> TestResult {
    assert_eq!(eval_error("100 / age")?, "division by zero in `100 / age`");
    assert_eq!(eval_error("id % (age - age)")?, "division by zero in `id % (age - age)`");
    assert_eq!(eval_error("1 / 0")?, "division by zero in `1 / 0`");
    check("CASE WHEN age <> 0 THEN 100 / age ELSE -1 END", DataType::Int, &[i(3), i(-1), i(5), i(-1)])?;
    check("age <> 0 AND 100 / age > 1", DataType::Boolean, &[b(true), Null, b(true), b(false)])?;
    check("age = 0 OR 100 / age > 4", DataType::Boolean, &[b(false), Null, b(true), b(true)])?;
    check(
        "NULLIF(age, 0) IS NULL OR 100 / age > 4",
        DataType::Boolean,
        &[b(false), b(true), b(true), b(true)],
    )?;
    check("COALESCE(NULLIF(age, 0), 1)", DataType::Int, &[i(30), i(1), i(17), i(1)])?;
    // A constant division by zero on a batch of no rows does not fail.
    let empty = batch()?.slice(0, 0);
    assert_eq!(compiled("1 / 0")?.evaluate(&empty)?.len(), 0);
    Ok(())
}

/// Comparisons: null and NaN are never true, -0.0 = 0, numbers promote, a string or integer
/// literal against a TIMESTAMP is a timestamp, BOOLEAN takes = and <> only.
#[test]
fn comparisons_follow_sql_semantics() -> TestResult {
    check("age > 18", DataType::Boolean, &[b(true), Null, b(false), b(false)])?;
    check("age >= 17.5", DataType::Boolean, &[b(true), Null, b(false), b(false)])?;
    check("score = 0", DataType::Boolean, &[b(false), b(false), b(true), Null])?;
    check("score <> 1", DataType::Boolean, &[b(true), b(false), b(true), Null])?;
    check("score > -0.0", DataType::Boolean, &[b(true), b(false), b(false), Null])?;
    check("ts = '2024-05-01 12:00:00'", DataType::Boolean, &[b(true), Null, b(false), b(false)])?;
    check("'2024-05-01T12:00:00Z' < ts", DataType::Boolean, &[b(false), Null, b(false), b(true)])?;
    check("ts < 1", DataType::Boolean, &[b(false), Null, b(true), b(false)])?;
    check("active = TRUE", DataType::Boolean, &[b(true), b(false), Null, b(true)])?;
    check("active != false", DataType::Boolean, &[b(true), b(false), Null, b(true)])?;
    check("name <> 'ann'", DataType::Boolean, &[b(false), Null, b(true), b(true)])?;
    check("name > 'B'", DataType::Boolean, &[b(true), Null, b(true), b(true)])?;
    check("age == 30", DataType::Boolean, &[b(true), Null, b(false), b(false)])?;
    assert_eq!(compile_error("name = 3")?, "cannot compare STRING with INT (at column 1)");
    assert_eq!(compile_error("age < 'x'")?, "cannot compare INT with STRING (at column 1)");
    assert_eq!(compile_error("active < TRUE")?, "BOOLEAN compares with = and <> only (at column 1)");
    assert_eq!(
        compile_error("ts > 'yesterday'")?,
        "'yesterday' is not a timestamp like '2024-05-01 12:00:00' (at column 1)"
    );
    assert_eq!(compile_error("ts > name")?, "cannot compare TIMESTAMP with STRING (at column 1)");
    assert_eq!(
        compile_error("age = NULL")?,
        "a comparison with NULL is never true; use IS NULL or IS NOT NULL (at column 1)"
    );
    Ok(())
}

/// AND / OR / NOT use three-valued logic; IS [NOT] NULL / TRUE / FALSE never give null.
#[test]
fn logic_is_three_valued() -> TestResult {
    // active: true, false, null, true; age > 18: true, null, false, false
    check("active AND age > 18", DataType::Boolean, &[b(true), b(false), b(false), b(false)])?;
    check("active OR age > 18", DataType::Boolean, &[b(true), Null, Null, b(true)])?;
    check("NOT active", DataType::Boolean, &[b(false), b(true), Null, b(false)])?;
    check("active IS TRUE", DataType::Boolean, &[b(true), b(false), b(false), b(true)])?;
    check("active IS NOT TRUE", DataType::Boolean, &[b(false), b(true), b(true), b(false)])?;
    check("active IS FALSE", DataType::Boolean, &[b(false), b(true), b(false), b(false)])?;
    check("active IS NOT FALSE", DataType::Boolean, &[b(true), b(false), b(true), b(true)])?;
    check("active IS UNKNOWN", DataType::Boolean, &[b(false), b(false), b(true), b(false)])?;
    check("name IS NULL", DataType::Boolean, &[b(false), b(true), b(false), b(false)])?;
    check("blob IS NOT NULL", DataType::Boolean, &[b(true), b(false), b(true), b(true)])?;
    check("NOT (age > 18 OR name = 'Bob')", DataType::Boolean, &[b(false), Null, b(false), b(true)])?;
    assert_eq!(compile_error("age AND active")?, "AND needs a BOOLEAN operand, found INT (at column 1)");
    assert_eq!(compile_error("NOT name")?, "NOT needs a BOOLEAN operand, found STRING (at column 5)");
    Ok(())
}

/// BETWEEN is `x >= a AND x <= b`; IN is a chain of `=` joined by OR (a NULL in the list
/// makes a miss null).
#[test]
fn between_and_in() -> TestResult {
    check("age BETWEEN 17 AND 30", DataType::Boolean, &[b(true), Null, b(true), b(false)])?;
    check("age NOT BETWEEN 18 AND 29", DataType::Boolean, &[b(true), Null, b(true), b(true)])?;
    check("score BETWEEN -1 AND 2.5", DataType::Boolean, &[b(true), b(false), b(true), Null])?;
    check("age IN (30, 0)", DataType::Boolean, &[b(true), Null, b(false), b(true)])?;
    check("age NOT IN (30, 0)", DataType::Boolean, &[b(false), Null, b(true), b(false)])?;
    check("age IN (30, NULL)", DataType::Boolean, &[b(true), Null, Null, Null])?;
    check("name IN ('ann', 'Bob')", DataType::Boolean, &[b(true), Null, b(true), b(false)])?;
    assert_eq!(compile_error("age IN (1, 'x')")?, "cannot compare INT with STRING (at column 12)");
    assert_eq!(
        compile_error("age IN (SELECT 1)")?,
        "subqueries (IN (SELECT ...)) are not supported (at column 1)"
    );
    Ok(())
}

/// LIKE matches % and _; a literal pattern's backslash is an ordinary character; ESCAPE names
/// an escape character.
#[test]
fn like_matches_sql_patterns() -> TestResult {
    check("name LIKE 'a%'", DataType::Boolean, &[b(true), Null, b(false), b(false)])?;
    check("name LIKE '_ob'", DataType::Boolean, &[b(false), Null, b(true), b(false)])?;
    check("name NOT LIKE '%n%'", DataType::Boolean, &[b(false), Null, b(true), b(true)])?;
    check("name LIKE '%''%'", DataType::Boolean, &[b(false), Null, b(false), b(true)])?;
    check("'50%' LIKE '50!%' ESCAPE '!'", DataType::Boolean, &vec![b(true); 4])?;
    check("'50x' LIKE '50!%' ESCAPE '!'", DataType::Boolean, &vec![b(false); 4])?;
    check("'a!b' LIKE 'a!!b' ESCAPE '!'", DataType::Boolean, &vec![b(true); 4])?;
    check(r"'a\b' LIKE 'a\b'", DataType::Boolean, &vec![b(true); 4])?;
    check(r"'a%' LIKE 'a\%'", DataType::Boolean, &vec![b(false); 4])?;
    assert_eq!(compile_error("age LIKE '1%'")?, "LIKE needs a STRING argument, found INT (at column 1)");
    assert_eq!(
        compile_error("name LIKE 'a' ESCAPE 'xy'")?,
        "ESCAPE takes a string of one character (at column 22)"
    );
    assert_eq!(
        compile_error("name LIKE name ESCAPE '!'")?,
        "LIKE ... ESCAPE needs a literal pattern (at column 1)"
    );
    assert_eq!(
        compile_error("name ILIKE 'a'")?,
        "ILIKE is not supported; use LOWER(x) LIKE 'pattern' (at column 1)"
    );
    Ok(())
}

/// CASE (searched and simple), COALESCE, NULLIF and IF: the first true condition wins, a null
/// condition is not true, no ELSE gives null, result types promote.
#[test]
fn conditionals() -> TestResult {
    check(
        "CASE WHEN age >= 18 THEN 'adult' WHEN age < 18 THEN 'minor' END",
        DataType::String,
        &[s("adult"), Null, s("minor"), s("minor")],
    )?;
    check(
        "CASE WHEN age >= 18 THEN 'adult' ELSE 'unknown' END",
        DataType::String,
        &[s("adult"), s("unknown"), s("unknown"), s("unknown")],
    )?;
    check(
        "CASE id WHEN 1 THEN 'one' WHEN 3 THEN 'three' END",
        DataType::String,
        &[s("one"), Null, s("three"), Null],
    )?;
    check("CASE WHEN active THEN age ELSE 1.5 END", DataType::Double, &[d(30.0), d(1.5), d(1.5), d(0.0)])?;
    check("CASE WHEN active THEN NULL ELSE id END", DataType::BigInt, &[Null, i(2), i(3), Null])?;
    check("COALESCE(name, 'none')", DataType::String, &[s("ann"), s("none"), s("Bob"), s("it's")])?;
    check("COALESCE(age, id)", DataType::BigInt, &[i(30), i(2), i(17), i(0)])?;
    check("COALESCE(NULL, age)", DataType::Int, &[i(30), Null, i(17), i(0)])?;
    check("NULLIF(age, 30)", DataType::Int, &[Null, Null, i(17), i(0)])?;
    check(
        "IF(age > 18, 'adult', 'minor')",
        DataType::String,
        &[s("adult"), s("minor"), s("minor"), s("minor")],
    )?;
    assert_eq!(
        compile_error("CASE WHEN active THEN 'x' ELSE 1 END")?,
        "CASE results have different types: STRING and INT (at column 1)"
    );
    assert_eq!(
        compile_error("CASE WHEN age THEN 1 END")?,
        "WHEN needs a BOOLEAN operand, found INT (at column 11)"
    );
    assert_eq!(compile_error("IF(active, 1)")?, "IF takes 3 arguments, found 2 (at column 1)");
    assert_eq!(
        compile_error("COALESCE(name, age)")?,
        "COALESCE arguments have different types: STRING and INT (at column 1)"
    );
    Ok(())
}

/// UPPER, LOWER, CONCAT and ||, SUBSTRING, TRIM and CHAR_LENGTH, with nulls and non-ASCII text.
#[test]
fn string_functions() -> TestResult {
    check("UPPER(name)", DataType::String, &[s("ANN"), Null, s("BOB"), s("IT'S")])?;
    check("LOWER(name)", DataType::String, &[s("ann"), Null, s("bob"), s("it's")])?;
    check("UPPER('straße')", DataType::String, &vec![s("STRASSE"); 4])?;
    check("CONCAT(name, '-', 'x')", DataType::String, &[s("ann-x"), Null, s("Bob-x"), s("it's-x")])?;
    check("name || '!'", DataType::String, &[s("ann!"), Null, s("Bob!"), s("it's!")])?;
    check("SUBSTRING('hello' FROM 2 FOR 3)", DataType::String, &[s("ell"), s("ell"), s("ell"), s("ell")])?;
    check("SUBSTRING('hello', 2)", DataType::String, &[s("ello"), s("ello"), s("ello"), s("ello")])?;
    check("SUBSTRING('hello', 0, 2)", DataType::String, &[s("he"), s("he"), s("he"), s("he")])?;
    check("SUBSTRING('hello', -3)", DataType::String, &[s("llo"), s("llo"), s("llo"), s("llo")])?;
    check("SUBSTRING('hello', 2, -1)", DataType::String, &[s(""), s(""), s(""), s("")])?;
    check("SUBSTRING('hello', 9)", DataType::String, &[s(""), s(""), s(""), s("")])?;
    check("SUBSTR('héllo', 2, 2)", DataType::String, &[s("él"), s("él"), s("él"), s("él")])?;
    check("SUBSTRING(name, age - 16, 2)", DataType::String, &[s(""), Null, s("Bo"), s("")])?;
    check("TRIM('  x  ')", DataType::String, &[s("x"), s("x"), s("x"), s("x")])?;
    check("TRIM(LEADING 'x' FROM 'xxaxx')", DataType::String, &[s("axx"), s("axx"), s("axx"), s("axx")])?;
    check("TRIM(TRAILING FROM '  a  ')", DataType::String, &[s("  a"), s("  a"), s("  a"), s("  a")])?;
    check("TRIM(BOTH 'ab' FROM 'abxba')", DataType::String, &[s("x"), s("x"), s("x"), s("x")])?;
    check("TRIM(BOTH 'n' FROM name)", DataType::String, &[s("a"), Null, s("Bob"), s("it's")])?;
    check("CHAR_LENGTH(name)", DataType::Int, &[i(3), Null, i(3), i(4)])?;
    check("CHARACTER_LENGTH('héllo')", DataType::Int, &vec![i(5); 4])?;
    assert_eq!(compile_error("UPPER(age)")?, "UPPER needs a STRING argument, found INT (at column 7)");
    assert_eq!(compile_error("UPPER(name, name)")?, "UPPER takes 1 argument, found 2 (at column 1)");
    assert_eq!(
        compile_error("SUBSTRING(name, 'x')")?,
        "SUBSTRING needs an INT or BIGINT position, found STRING (at column 17)"
    );
    assert_eq!(
        compile_error("CONCAT(name, age)")?,
        "CONCAT needs a STRING argument, found INT (at column 14)"
    );
    Ok(())
}

/// JSON_VALUE returns scalars as text (strings unquoted), null for objects, arrays, JSON null,
/// missing paths and invalid JSON; the path is checked when compiled.
#[test]
fn json_value_reads_scalars() -> TestResult {
    check("JSON_VALUE(j, '$.a.b')", DataType::String, &[s("x"), Null, Null, Null])?;
    check("JSON_VALUE(j, '$.a.n')", DataType::String, &[s("1.5"), Null, Null, Null])?;
    check("JSON_VALUE(j, '$.a.t')", DataType::String, &[s("true"), Null, Null, Null])?;
    check("JSON_VALUE(j, '$.a.o')", DataType::String, &vec![Null; 4])?;
    check("JSON_VALUE(j, '$.a.l')", DataType::String, &vec![Null; 4])?;
    check("JSON_VALUE(j, '$.a.z')", DataType::String, &vec![Null; 4])?;
    check("JSON_VALUE(j, '$.arr[1]')", DataType::String, &[s("20"), Null, Null, Null])?;
    check("JSON_VALUE(j, '$.a.l[0]')", DataType::String, &[s("1"), Null, Null, Null])?;
    check("JSON_VALUE(j, '$[''a b'']')", DataType::String, &[s("sp"), Null, Null, Null])?;
    check("JSON_VALUE(j, 'lax $[\"arr\"][0]')", DataType::String, &[s("10"), Null, Null, Null])?;
    check("JSON_VALUE(j, '$.missing.deeper')", DataType::String, &vec![Null; 4])?;
    assert!(compile_error("JSON_VALUE(j, 'a.b')")?.starts_with("JSON path 'a.b': it must start with $"));
    let e = compile_error("JSON_VALUE(j, '$.a[x]')")?;
    assert!(
        e.contains("a [...] step takes an index or a quoted key") && e.ends_with("(at column 15)"),
        "{e}"
    );
    assert_eq!(
        compile_error("JSON_VALUE(j, name)")?,
        "JSON_VALUE needs a literal path like '$.a.b' (at column 15)"
    );
    Ok(())
}

/// CAST converts with Arrow (STRING <-> TIMESTAMP with Keel's text form); a value that does not
/// convert fails the batch naming it, TRY_CAST gives null; a constant is converted once.
#[test]
fn cast_and_try_cast() -> TestResult {
    check("CAST(age AS STRING)", DataType::String, &[s("30"), Null, s("17"), s("0")])?;
    check(
        "CAST(age AS BIGINT) * 3000000000",
        DataType::BigInt,
        &[i(90_000_000_000), Null, i(51_000_000_000), i(0)],
    )?;
    check("CAST('12' AS INT) + age", DataType::Int, &[i(42), Null, i(29), i(12)])?;
    check(
        "CAST(ts AS VARCHAR)",
        DataType::String,
        &[s("2024-05-01 12:00:00.000"), Null, s("1970-01-01 00:00:00.000"), s("2024-05-01 12:00:00.001")],
    )?;
    check(
        "CAST('2024-05-01 12:00:00' AS TIMESTAMP(3)) = ts",
        DataType::Boolean,
        &[b(true), Null, b(false), b(false)],
    )?;
    check("TRY_CAST(name AS INT)", DataType::Int, &vec![Null; 4])?;
    check("TRY_CAST(score AS BIGINT)", DataType::BigInt, &[i(2), Null, i(0), Null])?;
    check("CAST(active AS STRING)", DataType::String, &[s("true"), s("false"), Null, s("true")])?;
    assert_eq!(eval_error("CAST(name AS INT)")?, "`CAST(name AS INT)`: 'ann' is not a valid INT");
    assert_eq!(eval_error("CAST(score AS BIGINT)")?, "`CAST(score AS BIGINT)`: NaN is not a valid BIGINT");
    check("CASE WHEN age > 100 THEN CAST(name AS INT) ELSE 0 END", DataType::Int, &vec![i(0); 4])?;
    assert_eq!(
        compile_error("CAST('abc' AS INT)")?,
        "`CAST('abc' AS INT)`: 'abc' is not a valid INT (at column 6)"
    );
    assert_eq!(compile_error("CAST(age AS INTERVAL)")?, "CAST to INTERVAL is not supported (at column 6)");
    assert_eq!(compile_error("CAST(active AS TIMESTAMP)")?, "cannot CAST BOOLEAN to TIMESTAMP (at column 6)");
    Ok(())
}

/// Subqueries, aggregates, window functions, unknown functions and other constructs are
/// refused with their name and position.
#[test]
fn unsupported_constructs_are_refused_with_their_position() -> TestResult {
    for (text, want) in [
        ("(SELECT 1)", "subqueries are not supported (at column 2)"),
        ("EXISTS (SELECT 1)", "subqueries are not supported (at column 9)"),
        ("age + SUM(age)", "aggregate function SUM is not supported (at column 7)"),
        ("COUNT(*)", "aggregate function COUNT is not supported (at column 1)"),
        ("avg(score) > 1", "aggregate function AVG is not supported (at column 1)"),
        ("SUM(age) OVER (PARTITION BY name)", "window function SUM(...) OVER is not supported (at column 1)"),
        (
            "ROW_NUMBER() OVER (ORDER BY id)",
            "window function ROW_NUMBER(...) OVER is not supported (at column 1)",
        ),
        ("LAG(age)", "window function LAG is not supported (at column 1)"),
        ("1 + FOO(age)", "unknown function FOO (at column 5)"),
        ("INTERVAL '1' DAY", "INTERVAL is not supported (at column 10)"),
        ("EXTRACT(YEAR FROM ts)", "EXTRACT is not supported (at column 19)"),
        ("age IS DISTINCT FROM 1", "IS [NOT] DISTINCT FROM is not supported (at column 1)"),
        ("age +", "Expected: an expression, found: the end (at column 6)"),
        ("age age", "unexpected age after the expression (at column 5)"),
        ("", "empty expression"),
    ] {
        assert_eq!(compile_error(text)?, want, "{text}");
    }
    Ok(())
}

/// The SQL type names map onto Keel's types; others are not supported.
#[test]
fn sql_type_names() -> TestResult {
    for (text, want) in [
        ("STRING", Some(DataType::String)),
        ("VARCHAR", Some(DataType::String)),
        ("VARCHAR(20)", Some(DataType::String)),
        ("CHAR(3)", Some(DataType::String)),
        ("INT", Some(DataType::Int)),
        ("INTEGER", Some(DataType::Int)),
        ("BIGINT", Some(DataType::BigInt)),
        ("BOOLEAN", Some(DataType::Boolean)),
        ("DOUBLE", Some(DataType::Double)),
        ("TIMESTAMP", Some(DataType::Timestamp)),
        ("TIMESTAMP(3)", Some(DataType::Timestamp)),
        ("TIMESTAMP_LTZ", Some(DataType::Timestamp)),
        ("TIMESTAMP_LTZ(3)", Some(DataType::Timestamp)),
        ("TIMESTAMP(3) WITHOUT TIME ZONE", Some(DataType::Timestamp)),
        ("TIMESTAMP WITH TIME ZONE", None),
        ("BYTES", Some(DataType::Bytes)),
        ("VARBINARY", Some(DataType::Bytes)),
        ("TIMESTAMP(6)", None),
        ("FLOAT", None),
        ("TIMESTAMP_LTZ(9)", None),
    ] {
        let tree = parse_expr(&format!("CAST(x AS {text})"))?;
        let ast::Expr::Cast { data_type, .. } = tree else {
            return Err(format!("{text}: not a CAST").into());
        };
        assert_eq!(sql_type(&data_type), want, "{text}");
    }
    Ok(())
}

/// Select items take an optional alias, with or without AS; the dialect takes backquotes,
/// `!=` and `||`.
#[test]
fn select_items_and_dialect() -> TestResult {
    let (e, alias) = parse_select_item("age + 1 AS next")?;
    assert_eq!(e.to_string(), "age + 1");
    assert_eq!(alias.map(|a| a.value), Some("next".to_string()));
    let (_, alias) = parse_select_item("`order-id` oid")?;
    assert_eq!(alias.map(|a| a.value), Some("oid".to_string()));
    let (_, alias) = parse_select_item("name")?;
    assert!(alias.is_none());
    assert!(parse_expr("a != 1 AND b || c = 'x'").is_ok());
    let e = parse_select_item("*").err().ok_or("* parsed")?;
    assert_eq!(e.reason, "`*` is not supported here; list the columns");
    let e = parse_expr("a = 'open").err().ok_or("parsed")?;
    assert_eq!((e.span.start.line, e.span.start.column), (1, 5));
    Ok(())
}

/// Parsing and compiling arbitrary text never panics, and whatever compiles evaluates (or
/// fails with an error) without panicking.
#[test]
fn arbitrary_text_never_panics() -> TestResult {
    let s = schema()?;
    let b = batch()?;
    let pieces = [
        "age",
        "name",
        "score",
        "ts",
        "j",
        "active",
        "(",
        ")",
        "+",
        "-",
        "*",
        "/",
        "%",
        "=",
        "<>",
        "<",
        "AND",
        "OR",
        "NOT",
        "IS",
        "NULL",
        "CASE",
        "WHEN",
        "THEN",
        "ELSE",
        "END",
        "'x'",
        "0",
        "1",
        "2.5",
        "CAST(",
        "AS INT)",
        "UPPER(",
        "SUBSTRING(",
        ",",
        "LIKE",
        "'%'",
        "IN",
        "BETWEEN",
        "COALESCE(",
        "JSON_VALUE(",
        "'$.a'",
        "TRIM(",
        "FROM",
        "||",
        "TRUE",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..5000 {
        let mut text = String::new();
        for _ in 0..(seed % 9) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            text.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            text.push(' ');
        }
        seed = seed.wrapping_add(0x9e37_79b9);
        if let Ok(tree) = parse_expr(&text) {
            if let Ok(e) = compile(&tree, &s) {
                let _ = e.evaluate(&b);
            }
        }
    }
    Ok(())
}

/// Very deep or long expressions are handled without overflowing the stack (a chain of `+`
/// is as deep as it is long): a long AND / OR chain or IN list compiles and evaluates, an
/// arithmetic chain deeper than the limit is refused, text beyond the limit is refused.
#[test]
fn deep_and_long_expressions_do_not_overflow() -> TestResult {
    // Through the public paths (Filter / Projection parse), on a thread with a small stack.
    let run_on_small_stack = |text: String| -> std::thread::Result<Result<Option<usize>, String>> {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || -> Result<Option<usize>, String> {
                let s = schema().map_err(|e| e.to_string())?;
                let b = batch().map_err(|e| e.to_string())?;
                let items = [format!("({text}) IS NOT NULL AS x")];
                let p = crate::Projection::parse("select", &items, &s).map_err(|e| e.to_string())?;
                Ok(Some(p.apply_batch(&b).map_err(|e| e.to_string())?.num_rows()))
            })
            .map_err(|e| Box::new(e.to_string()) as Box<dyn std::any::Any + Send>)?
            .join()
    };
    let ors = vec!["age > 1"; 3000].join(" OR ");
    assert_eq!(run_on_small_stack(ors).map_err(|_| "panicked")?, Ok(Some(4)));
    let list = (0..5000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    assert_eq!(run_on_small_stack(format!("age IN ({list})")).map_err(|_| "panicked")?, Ok(Some(4)));
    let sum = vec!["age"; 400].join(" + ");
    assert_eq!(run_on_small_stack(sum).map_err(|_| "panicked")?, Ok(Some(4)));
    let chain = vec!["age"; 10000].join("+");
    let got = run_on_small_stack(chain).map_err(|_| "panicked")?;
    assert!(matches!(&got, Err(e) if e.contains("nested too deeply (more than 500 levels)")), "{got:?}");
    let long = vec!["age"; 20000].join(" + ");
    let got = run_on_small_stack(long).map_err(|_| "panicked")?;
    assert!(matches!(&got, Err(e) if e.contains("at most 65536 are taken")), "{got:?}");
    Ok(())
}

/// sqlparser's rendering of a parsed expression parses back to an expression with the same
/// type and values (the SQL front-end can hand expressions on as text).
#[test]
fn rendered_expressions_parse_back_the_same() -> TestResult {
    for text in [
        "`name` || 'x''y'",
        "CAST(ts AS TIMESTAMP_LTZ(3))",
        "TRY_CAST(name AS INT)",
        "SUBSTRING(name FROM 2 FOR 1)",
        "SUBSTRING(name, 2, 1)",
        "TRIM(LEADING 'a' FROM name)",
        "JSON_VALUE(j, '$[''a b'']')",
        "ts > TIMESTAMP '2024-05-01 12:00:00'",
        "CASE id WHEN 1 THEN 'one' ELSE 'other' END",
        "age NOT BETWEEN 1 AND 20 OR name NOT LIKE 'a!%' ESCAPE '!'",
        "IF(active IS NOT TRUE, -age, age % 3)",
        "age IN (1, 2, NULL)",
    ] {
        let first = parse_expr(text)?;
        let rendered = first.to_string();
        let (t1, v1) = run(text)?;
        let (t2, v2) = run(&rendered)?;
        assert_eq!((t1, &v1), (t2, &v2), "{text} -> {rendered}");
    }
    Ok(())
}

/// `row.field` reads a ROW column's field (nested rows too), null where the row is null;
/// an unknown field and a field of a non-ROW column are refused by name.
#[test]
fn row_fields_are_read_by_name() -> TestResult {
    let ty: DataType = "ROW<owner STRING, inner ROW<n INT>>".parse()?;
    let schema =
        Schema::from_columns("columns", &[ColumnDef::new("id", DataType::BigInt), ColumnDef::new("p", ty)])?;
    let rows = vec![
        crate::value::Row::new(vec![
            Value::Int(1),
            Value::Row(vec![Value::String("ann".into()), Value::Row(vec![Value::Int(7)])]),
        ]),
        crate::value::Row::new(vec![Value::Int(2), Value::Null]),
        crate::value::Row::new(vec![Value::Int(3), Value::Row(vec![Value::Null, Value::Null])]),
    ];
    let batch = crate::batch::batch_of_rows(&schema, &rows).map_err(|(i, e)| format!("row {i}: {e}"))?;
    let eval = |text: &str| -> Result<(DataType, Vec<Value>), Box<dyn Error>> {
        let e = compile(&parse_expr(text)?, &schema).map_err(|e| format!("{text}: {e}"))?;
        let out = e.evaluate(&batch)?;
        Ok((e.data_type(), (0..out.len()).map(|i| value_at(out.as_ref(), i)).collect()))
    };
    assert_eq!(
        eval("p.owner")?,
        (DataType::String, vec![Value::String("ann".into()), Value::Null, Value::Null])
    );
    assert_eq!(eval("UPPER(p.owner)")?.1, vec![Value::String("ANN".into()), Value::Null, Value::Null]);
    assert_eq!(eval("p.inner.n")?, (DataType::Int, vec![Value::Int(7), Value::Null, Value::Null]));
    let refused = |text: &str| {
        compile(&parse_expr(text).map_err(|e| e.to_string())?, &schema).map(|_| ()).map_err(|e| e.to_string())
    };
    assert_eq!(
        refused("p.nope"),
        Err("the ROW has no field `nope`; its fields: owner, inner (at column 1)".into())
    );
    assert_eq!(refused("id.x"), Err("`.x`: BIGINT is not a ROW, it has no fields (at column 1)".into()));
    Ok(())
}
