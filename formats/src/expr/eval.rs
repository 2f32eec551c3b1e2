//! Evaluating a typed tree over a batch with Arrow kernels.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow_arith::arity::unary;
use arrow_arith::boolean::{and, and_kleene, is_not_null, is_null, not, or_kleene};
use arrow_arith::numeric;
use arrow_array::builder::StringBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{
    new_null_array, Array, ArrayRef, BooleanArray, Datum, Int32Array, RecordBatch, Scalar, StringArray,
    TimestampMillisecondArray, UInt32Array,
};
use arrow_cast::cast::{cast_with_options, CastOptions};
use arrow_ord::cmp;
use arrow_schema::ArrowError;
use arrow_select::nullif::nullif;
use arrow_select::zip::zip;
use keel_proto::{KeelError, Result};

use super::compile::{ArithOp, CmpOp, Node, PathStep, Typed};
use crate::batch::arrow_type;
use crate::options::TimestampStandard;
use crate::schema::DataType;

/// A value of an expression over a batch: one value per row, or one value for all rows.
#[derive(Debug, Clone)]
pub(super) enum Val {
    Array(ArrayRef),
    /// A one-element array standing for every row.
    Scalar(ArrayRef),
}

impl Datum for Val {
    fn get(&self) -> (&dyn Array, bool) {
        match self {
            Val::Array(a) => (a.as_ref(), false),
            Val::Scalar(a) => (a.as_ref(), true),
        }
    }
}

impl Val {
    fn inner(&self) -> &ArrayRef {
        match self {
            Val::Array(a) | Val::Scalar(a) => a,
        }
    }

    fn is_scalar(&self) -> bool {
        matches!(self, Val::Scalar(_))
    }

    /// One value per row (`rows` rows).
    pub(super) fn into_array(self, rows: usize) -> Result<ArrayRef> {
        match self {
            Val::Array(a) => Ok(a),
            Val::Scalar(a) if rows == 1 => Ok(a),
            Val::Scalar(a) if a.is_null(0) => Ok(new_null_array(a.data_type(), rows)),
            Val::Scalar(a) => {
                let zeros = UInt32Array::from(vec![0u32; rows]);
                arrow_select::take::take(a.as_ref(), &zeros, None).map_err(arrow_error)
            }
        }
    }
}

/// A result of kernel `f` whose inputs were `inputs`: a scalar when all of them were.
fn wrap(a: ArrayRef, inputs: &[&Val]) -> Val {
    if inputs.iter().all(|v| v.is_scalar()) {
        Val::Scalar(a)
    } else {
        Val::Array(a)
    }
}

fn arrow_error(e: ArrowError) -> KeelError {
    KeelError::internal(format!("expression: {e}"))
}

/// What an evaluation sees: the batch, its row count, and which rows count for errors (a
/// CASE branch is evaluated on every row, but a division by zero or a failed CAST fails the
/// batch only on rows the branch is taken for). `active` has no nulls.
pub(super) struct Ctx<'a> {
    batch: Option<&'a RecordBatch>,
    rows: usize,
    active: Option<BooleanArray>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(batch: &'a RecordBatch) -> Ctx<'a> {
        Ctx { batch: Some(batch), rows: batch.num_rows(), active: None }
    }

    /// No batch: constants only, one row.
    pub(super) fn constant() -> Ctx<'static> {
        Ctx { batch: None, rows: 1, active: None }
    }

    /// The same batch, with only the rows of `mask` (no nulls) active.
    fn narrowed(&self, mask: &BooleanArray) -> Result<Ctx<'a>> {
        let active = match &self.active {
            Some(a) => and(a, mask).map_err(arrow_error)?,
            None => mask.clone(),
        };
        Ok(Ctx { batch: self.batch, rows: self.rows, active: Some(active) })
    }

    /// Whether any row is active.
    fn any_active(&self) -> bool {
        match &self.active {
            Some(a) => a.true_count() > 0,
            None => self.rows > 0,
        }
    }

    /// The first active row among those of `rows` (a mask of `self.rows` rows, no nulls).
    fn first_active(&self, rows: &BooleanArray) -> Result<Option<usize>> {
        let hits = match &self.active {
            Some(a) => and(a, rows).map_err(arrow_error)?,
            None => rows.clone(),
        };
        Ok(hits.values().set_indices().next())
    }
}

/// `b` with nulls as false (Arrow's `prep_null_mask_filter` expects a null buffer).
fn true_only(b: &BooleanArray) -> BooleanArray {
    if b.null_count() == 0 {
        b.clone()
    } else {
        arrow_select::filter::prep_null_mask_filter(b)
    }
}

/// A boolean value as a mask of `rows` rows: true where true, false where false or null.
fn mask_of(v: Val, rows: usize) -> Result<BooleanArray> {
    let a = v.into_array(rows)?;
    let b =
        a.as_boolean_opt().ok_or_else(|| KeelError::internal("expression: a condition is not BOOLEAN"))?;
    Ok(true_only(b))
}

fn boolean(v: &Val) -> Result<&BooleanArray> {
    v.inner().as_boolean_opt().ok_or_else(|| KeelError::internal("expression: an operand is not BOOLEAN"))
}

/// Both values as arrays of one length: unchanged if both are scalars, else `rows` each.
fn aligned(a: Val, b: Val, rows: usize) -> Result<(ArrayRef, ArrayRef, bool)> {
    if a.is_scalar() && b.is_scalar() {
        return Ok((a.inner().clone(), b.inner().clone(), true));
    }
    Ok((a.into_array(rows)?, b.into_array(rows)?, false))
}

pub(super) fn eval(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    stacker::maybe_grow(super::RED_ZONE, super::SEGMENT, || eval_node(t, ctx))
}

fn eval_node(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    match &t.node {
        Node::Null => Err(KeelError::internal("expression: an untyped NULL reached evaluation")),
        Node::Column(..) => eval_column(t, ctx),
        Node::Literal(a) => Ok(Val::Scalar(a.clone())),
        Node::Cast { .. } => eval_cast(t, ctx),
        Node::Arith { .. } => eval_arith(t, ctx),
        Node::Neg(..) => eval_neg(t, ctx),
        Node::Compare { .. } => eval_compare(t, ctx),
        Node::And(..) | Node::Or(..) => eval_and_pair(t, ctx),
        Node::Not(..) => eval_not(t, ctx),
        Node::IsNull { .. } => eval_isnull(t, ctx),
        Node::IsBool { .. } => eval_isbool(t, ctx),
        Node::Like { .. } => eval_like(t, ctx),
        Node::Case { whens, otherwise } => case(t, whens, otherwise.as_deref(), ctx),
        Node::Coalesce(list) => coalesce(t, list, ctx),
        Node::Upper(..) | Node::Lower(..) => eval_upper_pair(t, ctx),
        Node::CharLength(..) => eval_charlength(t, ctx),
        Node::Concat(..) => eval_concat(t, ctx),
        Node::Substring { .. } => eval_substring(t, ctx),
        Node::Trim { .. } => eval_trim(t, ctx),
        Node::JsonValue { .. } => eval_jsonvalue(t, ctx),
        Node::Field { input, index } => eval_field(input, *index, ctx),
    }
}

/// A ROW's field: the struct's child array, null where the row is null.
fn eval_field(input: &Typed, index: usize, ctx: &Ctx<'_>) -> Result<Val> {
    let v = eval(input, ctx)?;
    let scalar = v.is_scalar();
    let array = v.into_array(if scalar { 1 } else { ctx.rows })?;
    let rows = array
        .as_struct_opt()
        .ok_or_else(|| KeelError::internal("expression: field access on a value that is not a ROW"))?;
    let child = rows
        .columns()
        .get(index)
        .ok_or_else(|| KeelError::internal(format!("expression: the ROW has no field {index}")))?;
    let nulls = arrow_buffer::NullBuffer::union(rows.nulls(), child.nulls());
    let data = child.to_data().into_builder().nulls(nulls).build().map_err(arrow_error)?;
    let out = arrow_array::make_array(data);
    Ok(if scalar { Val::Scalar(out) } else { Val::Array(out) })
}

fn eval_column(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Column(i) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let batch = ctx.batch.ok_or_else(|| KeelError::internal("expression: no batch"))?;
    let column = batch
        .columns()
        .get(*i)
        .ok_or_else(|| KeelError::internal(format!("expression: the batch has no column {i}")))?;
    Ok(Val::Array(column.clone()))
}

fn eval_cast(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Cast { input, safe, text } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let to = t.ty.clone().ok_or_else(|| KeelError::internal("expression: CAST without a type"))?;
    let v = eval(input, ctx)?;
    cast(v, input.ty.clone(), to, *safe, text, ctx)
}

fn eval_arith(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Arith { op, left, right, text } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let l = eval(left, ctx)?;
    let r = eval(right, ctx)?;
    arith(*op, l, r, t.ty.clone(), text, ctx)
}

fn eval_neg(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Neg(a) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let v = eval(a, ctx)?;
    let out = numeric::neg_wrapping(v.inner().as_ref()).map_err(arrow_error)?;
    Ok(wrap(out, &[&v]))
}

fn eval_compare(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Compare { op, left, right } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let l = eval(left, ctx)?;
    let r = eval(right, ctx)?;
    compare(*op, l, r, ctx.rows)
}

fn eval_and_pair(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let (Node::And(left, right) | Node::Or(left, right)) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let is_and = matches!(t.node, Node::And(..));
    let l = eval(left, ctx)?;
    // The right side counts only where the left does not decide: a division in
    // `b <> 0 AND a / b > 1` is not checked where b = 0.
    let r = if right.may_fail() {
        let lb = l.clone().into_array(ctx.rows)?;
        let lb = lb.as_boolean_opt().ok_or_else(|| KeelError::internal("expression: not BOOLEAN"))?;
        let decided = if is_and { true_only(&not(lb).map_err(arrow_error)?) } else { true_only(lb) };
        let open = not(&decided).map_err(arrow_error)?;
        eval(right, &ctx.narrowed(&open)?)?
    } else {
        eval(right, ctx)?
    };
    let (la, ra, scalar) = aligned(l, r, ctx.rows)?;
    let (lb, rb) = (boolean(&Val::Array(la))?.clone(), boolean(&Val::Array(ra))?.clone());
    let out = if is_and { and_kleene(&lb, &rb) } else { or_kleene(&lb, &rb) }.map_err(arrow_error)?;
    let out: ArrayRef = Arc::new(out);
    Ok(if scalar { Val::Scalar(out) } else { Val::Array(out) })
}

fn eval_not(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Not(a) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let v = eval(a, ctx)?;
    let out = not(boolean(&v)?).map_err(arrow_error)?;
    Ok(wrap(Arc::new(out), &[&v]))
}

fn eval_isnull(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::IsNull { input, negated } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let v = eval(input, ctx)?;
    let out = if *negated { is_not_null(v.inner()) } else { is_null(v.inner()) }.map_err(arrow_error)?;
    Ok(wrap(Arc::new(out), &[&v]))
}

fn eval_isbool(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::IsBool { input, value, negated } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let v = eval(input, ctx)?;
    let b = boolean(&v)?;
    let hit = if *value { true_only(b) } else { true_only(&not(b).map_err(arrow_error)?) };
    let out = if *negated { not(&hit).map_err(arrow_error)? } else { hit };
    Ok(wrap(Arc::new(out), &[&v]))
}

fn eval_like(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Like { input, pattern, negated } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let s = eval(input, ctx)?;
    let p = eval(pattern, ctx)?;
    let out = if *negated { arrow_string::like::nlike(&s, &p) } else { arrow_string::like::like(&s, &p) }
        .map_err(arrow_error)?;
    Ok(wrap(Arc::new(out), &[&s, &p]))
}

fn eval_upper_pair(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let (Node::Upper(a) | Node::Lower(a)) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let upper = matches!(t.node, Node::Upper(_));
    let v = eval(a, ctx)?;
    let s = strings(&v)?;
    let mut b = StringBuilder::with_capacity(s.len(), s.value_data().len());
    for x in s.iter() {
        match x {
            None => b.append_null(),
            Some(x) => {
                for c in x.chars() {
                    if upper {
                        c.to_uppercase().try_for_each(|u| b.write_char(u))
                    } else {
                        c.to_lowercase().try_for_each(|u| b.write_char(u))
                    }
                    .map_err(|e| KeelError::internal(format!("expression: {e}")))?;
                }
                b.append_value("");
            }
        }
    }
    Ok(wrap(Arc::new(b.finish()), &[&v]))
}

fn eval_charlength(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::CharLength(a) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let v = eval(a, ctx)?;
    let s = strings(&v)?;
    let out: Int32Array =
        s.iter().map(|x| x.map(|x| i32::try_from(x.chars().count()).unwrap_or(i32::MAX))).collect();
    Ok(wrap(Arc::new(out), &[&v]))
}

fn eval_concat(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Concat(list) = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let vals = list.iter().map(|a| eval(a, ctx)).collect::<Result<Vec<_>>>()?;
    let refs: Vec<&Val> = vals.iter().collect();
    let n = out_rows(&refs, ctx.rows);
    let arrays = vals.iter().map(strings).collect::<Result<Vec<_>>>()?;
    let bytes: usize = arrays.iter().map(|a| a.value_data().len()).sum();
    let mut b = StringBuilder::with_capacity(n, bytes);
    for i in 0..n {
        let mut null = false;
        for (a, v) in arrays.iter().zip(&vals) {
            let j = if v.is_scalar() { 0 } else { i };
            if a.is_null(j) {
                null = true;
                break;
            }
        }
        if null {
            b.append_null();
            continue;
        }
        for (a, v) in arrays.iter().zip(&vals) {
            let j = if v.is_scalar() { 0 } else { i };
            b.write_str(a.value(j)).map_err(|e| KeelError::internal(format!("expression: {e}")))?;
        }
        b.append_value("");
    }
    Ok(wrap(Arc::new(b.finish()), &refs))
}

fn eval_substring(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Substring { input, from, len } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let sv = eval(input, ctx)?;
    let fv = eval(from, ctx)?;
    let lv = match len {
        Some(l) => Some(eval(l, ctx)?),
        None => None,
    };
    let mut refs = vec![&sv, &fv];
    refs.extend(lv.iter());
    let n = out_rows(&refs, ctx.rows);
    let s = strings(&sv)?;
    let f = int64s(&fv)?;
    let l = lv.as_ref().map(int64s).transpose()?;
    let mut b = StringBuilder::with_capacity(n, s.value_data().len());
    for i in 0..n {
        let si = if sv.is_scalar() { 0 } else { i };
        let fi = if fv.is_scalar() { 0 } else { i };
        let len = match (&l, &lv) {
            (Some(a), Some(v)) => {
                let li = if v.is_scalar() { 0 } else { i };
                if a.is_null(li) {
                    b.append_null();
                    continue;
                }
                Some(a.value(li))
            }
            _ => None,
        };
        if s.is_null(si) || f.is_null(fi) {
            b.append_null();
            continue;
        }
        b.append_value(substring(s.value(si), f.value(fi), len));
    }
    Ok(wrap(Arc::new(b.finish()), &refs))
}

fn eval_trim(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::Trim { input, chars, leading, trailing } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let sv = eval(input, ctx)?;
    let cv = match chars {
        Some(c) => Some(eval(c, ctx)?),
        None => None,
    };
    let mut refs = vec![&sv];
    refs.extend(cv.iter());
    let n = out_rows(&refs, ctx.rows);
    let s = strings(&sv)?;
    let c = cv.as_ref().map(strings).transpose()?;
    let mut b = StringBuilder::with_capacity(n, s.value_data().len());
    for i in 0..n {
        let si = if sv.is_scalar() { 0 } else { i };
        let set = match (&c, &cv) {
            (Some(a), Some(v)) => {
                let ci = if v.is_scalar() { 0 } else { i };
                if a.is_null(ci) {
                    b.append_null();
                    continue;
                }
                a.value(ci)
            }
            _ => " ",
        };
        if s.is_null(si) {
            b.append_null();
            continue;
        }
        let mut x = s.value(si);
        let hit = |ch: char| set.contains(ch);
        if *leading {
            x = x.trim_start_matches(hit);
        }
        if *trailing {
            x = x.trim_end_matches(hit);
        }
        b.append_value(x);
    }
    Ok(wrap(Arc::new(b.finish()), &refs))
}

fn eval_jsonvalue(t: &Typed, ctx: &Ctx<'_>) -> Result<Val> {
    let Node::JsonValue { input, path } = &t.node else {
        return Err(KeelError::internal("expression: node mismatch"));
    };
    let v = eval(input, ctx)?;
    let s = strings(&v)?;
    let mut b = StringBuilder::with_capacity(s.len(), s.value_data().len() / 4);
    for x in s.iter() {
        match x.and_then(|x| serde_json::from_str::<serde_json::Value>(x).ok()) {
            None => b.append_null(),
            Some(doc) => match walk(&doc, path) {
                Some(serde_json::Value::String(text)) => b.append_value(text),
                Some(n @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    write!(b, "{n}").map_err(|e| KeelError::internal(format!("expression: {e}")))?;
                    b.append_value("");
                }
                _ => b.append_null(),
            },
        }
    }
    Ok(wrap(Arc::new(b.finish()), &[&v]))
}

/// The number of output rows of a row-wise function of `inputs`: 1 when all are scalars.
fn out_rows(inputs: &[&Val], rows: usize) -> usize {
    if inputs.iter().all(|v| v.is_scalar()) {
        1
    } else {
        rows
    }
}

fn strings(v: &Val) -> Result<&StringArray> {
    v.inner()
        .as_string_opt::<i32>()
        .ok_or_else(|| KeelError::internal("expression: an operand is not STRING"))
}

fn int64s(v: &Val) -> Result<&arrow_array::Int64Array> {
    v.inner()
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| KeelError::internal("expression: a position is not BIGINT"))
}

/// SUBSTRING with 1-based `from` (0 is 1; a negative one counts from the end) and an optional
/// length (negative: empty), in characters, as Flink does.
fn substring(s: &str, from: i64, len: Option<i64>) -> &str {
    let chars = s.chars().count() as i64;
    let start = if from > 0 {
        from - 1
    } else if from < 0 {
        chars + from
    } else {
        0
    };
    let end = match len {
        Some(n) => start.saturating_add(n),
        None => chars,
    };
    let start = start.clamp(0, chars);
    let end = end.clamp(0, chars);
    if start >= end {
        return "";
    }
    let byte = |k: i64| s.char_indices().nth(k as usize).map_or(s.len(), |(b, _)| b);
    &s[byte(start)..byte(end)]
}

fn walk<'a>(doc: &'a serde_json::Value, path: &[PathStep]) -> Option<&'a serde_json::Value> {
    let mut at = doc;
    for step in path {
        at = match step {
            PathStep::Key(k) => at.as_object()?.get(k)?,
            PathStep::Index(i) => at.as_array()?.get(*i)?,
        };
    }
    Some(at)
}

fn compare(op: CmpOp, mut l: Val, mut r: Val, rows: usize) -> Result<Val> {
    // Arrow orders doubles by IEEE total order (-0.0 < +0.0, NaN above all and equal to
    // itself); in SQL -0.0 = 0 and a comparison involving NaN is not true.
    let mut nan = false;
    for v in [&mut l, &mut r] {
        let mut fixed: Option<ArrayRef> = None;
        if let Some(d) = v.inner().as_primitive_opt::<Float64Type>() {
            if d.values().iter().any(|x| *x == 0.0 && x.is_sign_negative()) {
                fixed = Some(Arc::new(unary::<_, _, Float64Type>(d, |x| x + 0.0)));
            }
            nan |= d.values().iter().any(|x| x.is_nan());
        }
        if let Some(fixed) = fixed {
            *v = if v.is_scalar() { Val::Scalar(fixed) } else { Val::Array(fixed) };
        }
    }
    let out = match op {
        CmpOp::Eq => cmp::eq(&l, &r),
        CmpOp::Ne => cmp::neq(&l, &r),
        CmpOp::Lt => cmp::lt(&l, &r),
        CmpOp::Le => cmp::lt_eq(&l, &r),
        CmpOp::Gt => cmp::gt(&l, &r),
        CmpOp::Ge => cmp::gt_eq(&l, &r),
    }
    .map_err(arrow_error)?;
    let scalar = l.is_scalar() && r.is_scalar();
    if !nan {
        let out: ArrayRef = Arc::new(out);
        return Ok(if scalar { Val::Scalar(out) } else { Val::Array(out) });
    }
    let n = if scalar { 1 } else { rows };
    let mut out = out;
    for v in [l, r] {
        let a = v.into_array(n)?;
        if let Some(d) = a.as_primitive_opt::<Float64Type>() {
            let not_nan = BooleanArray::from_unary(d, |x| !x.is_nan());
            out = and(&out, &not_nan).map_err(arrow_error)?;
        }
    }
    let out: ArrayRef = Arc::new(out);
    Ok(if scalar { Val::Scalar(out) } else { Val::Array(out) })
}

fn arith(
    op: ArithOp,
    mut l: Val,
    mut r: Val,
    ty: Option<DataType>,
    text: &str,
    ctx: &Ctx<'_>,
) -> Result<Val> {
    let integer = matches!(ty, Some(DataType::Int) | Some(DataType::BigInt));
    if integer && matches!(op, ArithOp::Div | ArithOp::Rem) {
        // Integer division by zero fails the batch (as in Flink) on the rows where it counts;
        // elsewhere the divisor is made null so the kernel does not fail.
        let zero: ArrayRef = match ty {
            Some(DataType::Int) => Arc::new(Int32Array::from(vec![0])),
            _ => Arc::new(arrow_array::Int64Array::from(vec![0i64])),
        };
        let zeros = true_only(&cmp::eq(&r, &Scalar::new(zero.clone())).map_err(arrow_error)?);
        if zeros.true_count() > 0 {
            let (la, ra, scalar) = aligned(l, r, ctx.rows)?;
            let zeros = true_only(&cmp::eq(&ra, &Scalar::new(zero)).map_err(arrow_error)?);
            let counted = and(&zeros, &is_not_null(&la).map_err(arrow_error)?).map_err(arrow_error)?;
            let fails = if scalar {
                counted.true_count() > 0 && ctx.any_active()
            } else {
                ctx.first_active(&counted)?.is_some()
            };
            if fails {
                return Err(KeelError::precondition(format!("division by zero in `{text}`")));
            }
            let ra = nullif(&ra, &zeros).map_err(arrow_error)?;
            l = if scalar { Val::Scalar(la) } else { Val::Array(la) };
            r = if scalar { Val::Scalar(ra) } else { Val::Array(ra) };
        }
    }
    let out = match op {
        ArithOp::Add => numeric::add_wrapping(&l, &r),
        ArithOp::Sub => numeric::sub_wrapping(&l, &r),
        ArithOp::Mul => numeric::mul_wrapping(&l, &r),
        ArithOp::Div => numeric::div(&l, &r),
        ArithOp::Rem => numeric::rem(&l, &r),
    }
    .map_err(|e| KeelError::precondition(format!("`{text}`: {e}")))?;
    Ok(wrap(out, &[&l, &r]))
}

fn cast(v: Val, from: Option<DataType>, to: DataType, safe: bool, text: &str, ctx: &Ctx<'_>) -> Result<Val> {
    let input = v.inner();
    let out: ArrayRef = match (&from, &to) {
        (Some(DataType::Timestamp), DataType::String) => {
            let ts = input
                .as_primitive_opt::<TimestampMillisecondType>()
                .ok_or_else(|| KeelError::internal("expression: not a TIMESTAMP"))?;
            let mut b = StringBuilder::with_capacity(ts.len(), ts.len() * 23);
            let mut buf = String::with_capacity(32);
            for x in ts.iter() {
                match x {
                    None => b.append_null(),
                    Some(ms) => {
                        buf.clear();
                        crate::time::format(ms, TimestampStandard::Sql, &mut buf);
                        b.append_value(&buf);
                    }
                }
            }
            Arc::new(b.finish())
        }
        (Some(DataType::String), DataType::Timestamp) => {
            let s = strings(&v)?;
            let out: TimestampMillisecondArray = s.iter().map(|x| x.and_then(crate::time::parse)).collect();
            Arc::new(out)
        }
        _ => {
            let options = CastOptions { safe: true, ..CastOptions::default() };
            cast_with_options(input.as_ref(), &arrow_type(&to), &options)
                .map_err(|e| KeelError::precondition(format!("`{text}`: {e}")))?
        }
    };
    if !safe {
        // A value that does not convert fails the batch (on a row that counts), naming it.
        let failed = and(&is_not_null(input).map_err(arrow_error)?, &is_null(&out).map_err(arrow_error)?)
            .map_err(arrow_error)?;
        if failed.true_count() > 0 {
            let fails = if v.is_scalar() { ctx.any_active() } else { ctx.first_active(&failed)?.is_some() };
            if fails {
                let i = failed.values().set_indices().next().unwrap_or(0);
                let value = arrow_cast::display::array_value_to_string(input.as_ref(), i)
                    .unwrap_or_else(|_| "?".into());
                let shown = if from == Some(DataType::String) { format!("'{value}'") } else { value };
                return Err(KeelError::precondition(format!("`{text}`: {shown} is not a valid {to}")));
            }
        }
    }
    Ok(wrap(out, &[&v]))
}

fn case(t: &Typed, whens: &[(Typed, Typed)], otherwise: Option<&Typed>, ctx: &Ctx<'_>) -> Result<Val> {
    let ty = t.ty.clone().ok_or_else(|| KeelError::internal("expression: CASE without a type"))?;
    let rows = ctx.rows;
    let mut open = BooleanArray::from(vec![true; rows]);
    let mut picked: Vec<(BooleanArray, Val)> = Vec::with_capacity(whens.len());
    for (cond, result) in whens {
        let c = if cond.may_fail() { eval(cond, &ctx.narrowed(&open)?)? } else { eval(cond, ctx)? };
        let hit = and(&mask_of(c, rows)?, &open).map_err(arrow_error)?;
        let v = if result.may_fail() { eval(result, &ctx.narrowed(&hit)?)? } else { eval(result, ctx)? };
        open = and(&open, &not(&hit).map_err(arrow_error)?).map_err(arrow_error)?;
        picked.push((hit, v));
    }
    let mut acc = match otherwise {
        Some(o) if o.may_fail() => eval(o, &ctx.narrowed(&open)?)?,
        Some(o) => eval(o, ctx)?,
        None => Val::Scalar(new_null_array(&arrow_type(&ty), 1)),
    };
    for (hit, v) in picked.into_iter().rev() {
        acc = Val::Array(zip(&hit, &v, &acc).map_err(arrow_error)?);
    }
    Ok(acc)
}

fn coalesce(t: &Typed, list: &[Typed], ctx: &Ctx<'_>) -> Result<Val> {
    let ty = t.ty.clone().ok_or_else(|| KeelError::internal("expression: COALESCE without a type"))?;
    let rows = ctx.rows;
    let mut open = BooleanArray::from(vec![true; rows]);
    let mut vals: Vec<(BooleanArray, Val)> = Vec::with_capacity(list.len());
    for a in list {
        let v = if a.may_fail() { eval(a, &ctx.narrowed(&open)?)? } else { eval(a, ctx)? };
        let present = is_not_null(&v.clone().into_array(rows)?).map_err(arrow_error)?;
        let hit = and(&present, &open).map_err(arrow_error)?;
        open = and(&open, &not(&present).map_err(arrow_error)?).map_err(arrow_error)?;
        vals.push((hit, v));
        if open.true_count() == 0 {
            break;
        }
    }
    let mut acc = Val::Scalar(new_null_array(&arrow_type(&ty), 1));
    for (hit, v) in vals.into_iter().rev() {
        acc = Val::Array(zip(&hit, &v, &acc).map_err(arrow_error)?);
    }
    Ok(acc)
}
