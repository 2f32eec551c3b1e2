//! From a sqlparser syntax tree to a typed tree of [`Node`]s (checked against a schema).

use std::sync::Arc;

use arrow_array::{
    new_null_array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray,
    TimestampMillisecondArray,
};
use sqlparser::ast::{
    self, BinaryOperator, CastKind, FunctionArg, FunctionArgExpr, FunctionArguments, Spanned, TrimWhereField,
    UnaryOperator, Value,
};
use sqlparser::tokenizer::Span;

use super::eval::{eval, Ctx, Val};
use super::parse::{sql_type, ExprError};
use crate::batch::arrow_type;
use crate::schema::{DataType, Schema};

/// A typed node. `ty` is `None` only for an untyped `NULL` literal, which takes the type its
/// context gives it ([`coerce`]).
#[derive(Debug, Clone)]
pub(super) struct Typed {
    pub node: Node,
    pub ty: Option<DataType>,
    /// Whether evaluating it can fail on some rows (a division, a CAST): such nodes are told
    /// which rows count (see `Ctx::active`). Computed once, when built.
    fails: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One step of a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathStep {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone)]
pub(super) enum Node {
    /// The untyped NULL literal (never evaluated: [`coerce`] turns it into a typed literal).
    Null,
    Column(usize),
    /// A one-element array of the node's type.
    Literal(ArrayRef),
    /// A conversion to the node's type; `safe` gives null where a value does not convert
    /// (TRY_CAST), otherwise that fails the batch. `text` is the expression, for errors.
    Cast {
        input: Box<Typed>,
        safe: bool,
        text: String,
    },
    /// Both operands have the node's type.
    Arith {
        op: ArithOp,
        left: Box<Typed>,
        right: Box<Typed>,
        text: String,
    },
    Neg(Box<Typed>),
    /// Both operands have the same type.
    Compare {
        op: CmpOp,
        left: Box<Typed>,
        right: Box<Typed>,
    },
    And(Box<Typed>, Box<Typed>),
    Or(Box<Typed>, Box<Typed>),
    Not(Box<Typed>),
    IsNull {
        input: Box<Typed>,
        negated: bool,
    },
    /// `IS [NOT] TRUE` / `IS [NOT] FALSE`.
    IsBool {
        input: Box<Typed>,
        value: bool,
        negated: bool,
    },
    Like {
        input: Box<Typed>,
        pattern: Box<Typed>,
        negated: bool,
    },
    /// Searched CASE: the first condition that is true picks its result; none gives `otherwise`
    /// (null when absent).
    Case {
        whens: Vec<(Typed, Typed)>,
        otherwise: Option<Box<Typed>>,
    },
    Coalesce(Vec<Typed>),
    Upper(Box<Typed>),
    Lower(Box<Typed>),
    Concat(Vec<Typed>),
    /// `from` and `len` are BIGINT.
    Substring {
        input: Box<Typed>,
        from: Box<Typed>,
        len: Option<Box<Typed>>,
    },
    Trim {
        input: Box<Typed>,
        chars: Option<Box<Typed>>,
        leading: bool,
        trailing: bool,
    },
    CharLength(Box<Typed>),
    /// Field `index` of a ROW value (`properties.owner`); null where the row is null.
    Field {
        input: Box<Typed>,
        index: usize,
    },
    JsonValue {
        input: Box<Typed>,
        path: Vec<PathStep>,
    },
}

impl Typed {
    fn new(node: Node, ty: DataType) -> Typed {
        let fails = node_may_fail(&node);
        Typed { node, ty: Some(ty), fails }
    }

    /// The untyped NULL literal.
    fn null() -> Typed {
        Typed { node: Node::Null, ty: None, fails: false }
    }

    /// Whether evaluating it can fail on some rows.
    pub(super) fn may_fail(&self) -> bool {
        self.fails
    }

    fn boxed(self) -> Box<Typed> {
        Box::new(self)
    }

    fn type_name(&self) -> &'static str {
        self.ty.as_ref().map_or("NULL", DataType::name)
    }

    /// The literal's value when this is a one-element literal.
    fn literal(&self) -> Option<&ArrayRef> {
        match &self.node {
            Node::Literal(a) => Some(a),
            _ => None,
        }
    }
}

/// Whether evaluating `node` can fail on some rows, from its children (shallow).
fn node_may_fail(node: &Node) -> bool {
    match node {
        Node::Null | Node::Column(_) | Node::Literal(_) => false,
        Node::Cast { safe, input, .. } => !safe || input.may_fail(),
        Node::Arith { op, left, right, .. } => {
            matches!(op, ArithOp::Div | ArithOp::Rem) || left.may_fail() || right.may_fail()
        }
        Node::Neg(a)
        | Node::Not(a)
        | Node::IsNull { input: a, .. }
        | Node::IsBool { input: a, .. }
        | Node::Upper(a)
        | Node::Lower(a)
        | Node::CharLength(a)
        | Node::Field { input: a, .. }
        | Node::JsonValue { input: a, .. } => a.may_fail(),
        Node::Compare { left, right, .. }
        | Node::And(left, right)
        | Node::Or(left, right)
        | Node::Like { input: left, pattern: right, .. } => left.may_fail() || right.may_fail(),
        Node::Case { whens, otherwise } => {
            whens.iter().any(|(c, v)| c.may_fail() || v.may_fail())
                || otherwise.as_ref().is_some_and(|o| o.may_fail())
        }
        Node::Coalesce(list) | Node::Concat(list) => list.iter().any(Typed::may_fail),
        Node::Substring { input, from, len } => {
            input.may_fail() || from.may_fail() || len.as_ref().is_some_and(|l| l.may_fail())
        }
        Node::Trim { input, chars, .. } => input.may_fail() || chars.as_ref().is_some_and(|c| c.may_fail()),
    }
}

fn literal(array: ArrayRef, ty: DataType) -> Typed {
    Typed::new(Node::Literal(array), ty)
}

/// The numeric rank for promotion (INT < BIGINT < DOUBLE); `None` for other types.
fn numeric_rank(t: &DataType) -> Option<u8> {
    match t {
        DataType::Int => Some(0),
        DataType::BigInt => Some(1),
        DataType::Double => Some(2),
        _ => None,
    }
}

fn is_numeric(t: Option<&DataType>) -> bool {
    t.is_some_and(|t| numeric_rank(t).is_some())
}

/// The common type of `types` (NULLs take any type; numbers promote), or the first pair that
/// does not fit.
fn unify(
    types: impl IntoIterator<Item = Option<DataType>>,
) -> Result<Option<DataType>, (DataType, DataType)> {
    let mut acc: Option<DataType> = None;
    for t in types.into_iter().flatten() {
        acc = Some(match acc {
            None => t,
            Some(a) if a == t => a,
            Some(a) => match (numeric_rank(&a), numeric_rank(&t)) {
                (Some(x), Some(y)) => {
                    if x >= y {
                        a
                    } else {
                        t
                    }
                }
                _ => return Err((a, t)),
            },
        });
    }
    Ok(acc)
}

/// Field `name` of the ROW value `t` (exact name first, else the one field whose name differs
/// only in case).
fn field(t: Typed, name: &ast::Ident, span: Span) -> R<Typed> {
    let Some(DataType::Row(fields)) = t.ty.clone() else {
        return err(span, format!("`.{}`: {} is not a ROW, it has no fields", name.value, t.type_name()));
    };
    let index = fields.iter().position(|f| f.name == name.value).or_else(|| {
        let mut m = fields.iter().enumerate().filter(|(_, f)| f.name.eq_ignore_ascii_case(&name.value));
        match (m.next(), m.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    });
    let Some(index) = index else {
        let known = fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ");
        return err(span, format!("the ROW has no field `{}`; its fields: {known}", name.value));
    };
    let ty = fields[index].data_type.clone();
    Ok(Typed::new(Node::Field { input: t.boxed(), index }, ty))
}

/// `t` as type `to`: a NULL literal becomes a typed null, a number widens; `None` when it
/// cannot (the caller reports it).
fn coerce(t: Typed, to: DataType) -> Option<Typed> {
    match t.ty.clone() {
        None => Some(literal(new_null_array(&arrow_type(&to), 1), to)),
        Some(from) if from == to => Some(t),
        Some(from) => match (numeric_rank(&from), numeric_rank(&to)) {
            (Some(x), Some(y)) if x < y => Some(widen(t, to)),
            _ => None,
        },
    }
}

/// A lossless numeric widening (a literal is converted once, here).
fn widen(t: Typed, to: DataType) -> Typed {
    if let Some(a) = t.literal() {
        if let Ok(c) = arrow_cast::cast(a, &arrow_type(&to)) {
            return literal(c, to);
        }
    }
    let text = String::new();
    Typed::new(Node::Cast { input: t.boxed(), safe: true, text }, to)
}

/// The compiler: the schema and the span to blame when a node has none.
pub(super) struct Compiler<'a> {
    pub schema: &'a Schema,
    /// How deep [`Compiler::compile`] is nested now.
    pub depth: std::cell::Cell<usize>,
}

/// The deepest nesting compiled (evaluation recurses as deep; a long chain of AND or OR is
/// balanced first and does not count). Compiling and evaluating grow their stack as needed
/// (`stacker`); the bound keeps a pathological expression from costing more than that.
pub(super) const MAX_DEPTH: usize = 500;

type R<T> = Result<T, ExprError>;

fn span_or(expr: &ast::Expr, outer: Span) -> Span {
    let s = expr.span();
    if s == Span::empty() {
        outer
    } else {
        s
    }
}

fn err<T>(span: Span, reason: impl Into<String>) -> R<T> {
    Err(ExprError::new(span, reason))
}

const AGGREGATES: &[&str] = &[
    "COUNT",
    "SUM",
    "SUM0",
    "AVG",
    "MIN",
    "MAX",
    "STDDEV",
    "STDDEV_POP",
    "STDDEV_SAMP",
    "VARIANCE",
    "VAR_POP",
    "VAR_SAMP",
    "COLLECT",
    "LISTAGG",
    "STRING_AGG",
    "ARRAY_AGG",
    "FIRST_VALUE",
    "LAST_VALUE",
    "JSON_OBJECTAGG",
    "JSON_ARRAYAGG",
    "BIT_AND",
    "BIT_OR",
    "BIT_XOR",
    "ANY_VALUE",
    "APPROX_COUNT_DISTINCT",
];

const WINDOW_FUNCTIONS: &[&str] =
    &["ROW_NUMBER", "RANK", "DENSE_RANK", "PERCENT_RANK", "CUME_DIST", "NTILE", "LAG", "LEAD"];

impl Compiler<'_> {
    pub(super) fn compile(&self, expr: &ast::Expr, outer: Span) -> R<Typed> {
        let depth = self.depth.get() + 1;
        if depth > MAX_DEPTH {
            return err(
                span_or(expr, outer),
                format!("the expression is nested too deeply (more than {MAX_DEPTH} levels)"),
            );
        }
        self.depth.set(depth);
        let out = stacker::maybe_grow(super::RED_ZONE, super::SEGMENT, || self.compile_node(expr, outer));
        self.depth.set(depth - 1);
        out
    }

    fn compile_node(&self, expr: &ast::Expr, outer: Span) -> R<Typed> {
        let span = span_or(expr, outer);
        use ast::Expr as E;
        match expr {
            E::Identifier(ident) => self.column(&ident.value, span),
            E::CompoundIdentifier(parts) => {
                let name = parts.iter().map(|p| p.value.as_str()).collect::<Vec<_>>().join(".");
                if self.schema.index_of(&name).is_some() {
                    return self.column(&name, span);
                }
                match parts.split_first() {
                    // `row.field[.field ...]`: a ROW column's fields.
                    Some((first, fields))
                        if !fields.is_empty() && self.schema.index_of(&first.value).is_some() =>
                    {
                        let mut t = self.column(&first.value, span)?;
                        for f in fields {
                            t = field(t, f, span)?;
                        }
                        Ok(t)
                    }
                    _ => self.column(&name, span),
                }
            }
            E::Nested(inner) => self.compile(inner, span),
            E::Value(v) => value_literal(&v.value, false, span),
            E::TypedString(ts) => {
                let Some(text) = ts.value.value.clone().into_string() else {
                    return err(span, format!("`{expr}` is not supported"));
                };
                let Some(to) = sql_type(&ts.data_type) else {
                    return err(span, format!("type {} is not supported", ts.data_type));
                };
                let input = literal(Arc::new(StringArray::from(vec![text])), DataType::String);
                self.cast(input, to, false, expr, span)
            }
            E::UnaryOp { op, expr: inner } => match op {
                UnaryOperator::Minus => {
                    if let E::Value(v) = inner.as_ref() {
                        if let Value::Number(..) = v.value {
                            return value_literal(&v.value, true, span);
                        }
                    }
                    let t = self.compile(inner, span)?;
                    match t.ty.clone() {
                        None => Ok(t),
                        Some(ty) if numeric_rank(&ty).is_some() => Ok(Typed::new(Node::Neg(t.boxed()), ty)),
                        Some(ty) => err(span, format!("unary - needs a number, found {ty}")),
                    }
                }
                UnaryOperator::Plus => {
                    let t = self.compile(inner, span)?;
                    if t.ty.is_none() || is_numeric(t.ty.as_ref()) {
                        Ok(t)
                    } else {
                        err(span, format!("unary + needs a number, found {}", t.type_name()))
                    }
                }
                UnaryOperator::Not => {
                    let t = self.boolean(inner, span, "NOT")?;
                    Ok(Typed::new(Node::Not(t.boxed()), DataType::Boolean))
                }
                other => err(span, format!("operator {other} is not supported")),
            },
            E::BinaryOp { left, op, right } => self.binary(expr, left, op, right, span),
            E::IsNull(inner) | E::IsNotNull(inner) => {
                let t = self.compile(inner, span)?;
                let negated = matches!(expr, E::IsNotNull(_));
                let input = match t.ty {
                    // NULL IS NULL: any type will do.
                    None => coerce(t, DataType::Boolean).ok_or_else(|| ExprError::new(span, "NULL"))?,
                    Some(_) => t,
                };
                Ok(Typed::new(Node::IsNull { input: input.boxed(), negated }, DataType::Boolean))
            }
            E::IsUnknown(inner) | E::IsNotUnknown(inner) => {
                let t = self.boolean(inner, span, "IS UNKNOWN")?;
                let negated = matches!(expr, E::IsNotUnknown(_));
                Ok(Typed::new(Node::IsNull { input: t.boxed(), negated }, DataType::Boolean))
            }
            E::IsTrue(inner) | E::IsNotTrue(inner) | E::IsFalse(inner) | E::IsNotFalse(inner) => {
                let (value, negated, what) = match expr {
                    E::IsTrue(_) => (true, false, "IS TRUE"),
                    E::IsNotTrue(_) => (true, true, "IS NOT TRUE"),
                    E::IsFalse(_) => (false, false, "IS FALSE"),
                    _ => (false, true, "IS NOT FALSE"),
                };
                let t = self.boolean(inner, span, what)?;
                Ok(Typed::new(Node::IsBool { input: t.boxed(), value, negated }, DataType::Boolean))
            }
            E::Between { expr: inner, negated, low, high } => {
                let x = self.compile(inner, span)?;
                let lo = self.compile(low, span)?;
                let hi = self.compile(high, span)?;
                let ge = compare(x.clone(), lo, CmpOp::Ge, span)?;
                let le = compare(x, hi, CmpOp::Le, span)?;
                let both = Typed::new(Node::And(ge.boxed(), le.boxed()), DataType::Boolean);
                Ok(not_if(both, *negated))
            }
            E::In { expr: inner, target, negated, .. } => match target {
                ast::InTarget::List(list) => {
                    let x = self.compile(inner, span)?;
                    let mut tests = Vec::with_capacity(list.len());
                    for item in list {
                        let item_span = span_or(item, span);
                        let v = self.compile(item, item_span)?;
                        tests.push(compare(x.clone(), v, CmpOp::Eq, item_span)?);
                    }
                    let Some(any) = balanced(tests, false) else {
                        return err(span, "IN needs at least one value");
                    };
                    Ok(not_if(any, *negated))
                }
                ast::InTarget::Subquery(_) => err(span, "subqueries (IN (SELECT ...)) are not supported"),
                _ => err(span, format!("`{expr}` is not supported; IN takes a list of values")),
            },
            E::Like { negated, any, expr: inner, pattern, escape_char } => {
                if *any {
                    return err(span, "LIKE ANY is not supported");
                }
                self.like(inner, pattern, escape_char.as_deref(), *negated, span)
            }
            E::ILike { .. } => err(span, "ILIKE is not supported; use LOWER(x) LIKE 'pattern'"),
            E::SimilarTo { .. } => err(span, "SIMILAR TO is not supported"),
            E::RLike { .. } => err(span, "REGEXP / RLIKE is not supported"),
            E::Cast { kind, expr: inner, data_type, format } => {
                if format.is_some() {
                    return err(span, "CAST ... FORMAT is not supported");
                }
                let Some(to) = sql_type(data_type) else {
                    return err(span, format!("CAST to {data_type} is not supported"));
                };
                let safe = matches!(kind, CastKind::TryCast | CastKind::SafeCast);
                let t = self.compile(inner, span)?;
                self.cast(t, to, safe, expr, span)
            }
            E::Case { operand, conditions, else_result, .. } => {
                self.case(operand.as_deref(), conditions, else_result.as_deref(), span)
            }
            E::Function(f) => self.function(expr, f, span),
            E::Substring { expr: inner, substring_from, substring_for, .. } => {
                let s = self.string_arg(inner, span, "SUBSTRING")?;
                let Some(from) = substring_from else {
                    return err(span, "SUBSTRING needs a start position: SUBSTRING(s FROM 1 FOR 3)");
                };
                let from = self.integer_arg(from, span, "SUBSTRING")?;
                let len = match substring_for {
                    Some(n) => Some(self.integer_arg(n, span, "SUBSTRING")?.boxed()),
                    None => None,
                };
                Ok(Typed::new(
                    Node::Substring { input: s.boxed(), from: from.boxed(), len },
                    DataType::String,
                ))
            }
            E::Trim { trim_where, trim_what, expr: inner, trim_characters } => {
                if trim_characters.is_some() {
                    return err(span, "TRIM(s, chars) is not supported; write TRIM(BOTH chars FROM s)");
                }
                let s = self.string_arg(inner, span, "TRIM")?;
                let chars = match trim_what {
                    Some(c) => Some(self.string_arg(c, span, "TRIM")?.boxed()),
                    None => None,
                };
                let (leading, trailing) = match trim_where {
                    None | Some(TrimWhereField::Both) => (true, true),
                    Some(TrimWhereField::Leading) => (true, false),
                    Some(TrimWhereField::Trailing) => (false, true),
                };
                Ok(Typed::new(Node::Trim { input: s.boxed(), chars, leading, trailing }, DataType::String))
            }
            E::Subquery(_) | E::Exists { .. } => err(span, "subqueries are not supported"),
            E::Wildcard(_) | E::QualifiedWildcard(..) => err(span, "`*` is not supported here"),
            E::Interval(_) => err(span, "INTERVAL is not supported"),
            E::Extract { .. } => err(span, "EXTRACT is not supported"),
            E::AtTimeZone { .. } => err(span, "AT TIME ZONE is not supported"),
            E::Position { .. } => err(span, "POSITION is not supported"),
            E::Ceil { .. } => err(span, "CEIL is not supported"),
            E::Floor { .. } => err(span, "FLOOR is not supported"),
            E::IsDistinctFrom(..) | E::IsNotDistinctFrom(..) => {
                err(span, "IS [NOT] DISTINCT FROM is not supported")
            }
            E::CompoundFieldAccess { .. } | E::JsonAccess { .. } => {
                err(span, format!("field access `{expr}` is not supported"))
            }
            E::Array(_) | E::Map(_) | E::Struct { .. } | E::Tuple(_) | E::Dictionary(_) => {
                err(span, format!("constructor `{expr}` is not supported"))
            }
            other => err(span, format!("`{other}` is not supported")),
        }
    }

    /// A column reference: the exact name, else the one column whose name matches ignoring case.
    fn column(&self, name: &str, span: Span) -> R<Typed> {
        let index = match self.schema.index_of(name) {
            Some(i) => i,
            None => {
                let mut matches = self
                    .schema
                    .columns()
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.name.eq_ignore_ascii_case(name))
                    .map(|(i, _)| i);
                match (matches.next(), matches.next()) {
                    (Some(i), None) => i,
                    (Some(_), Some(_)) => {
                        return err(
                            span,
                            format!(
                                "column `{name}` is ambiguous (names differ only in case); write it exactly"
                            ),
                        )
                    }
                    _ => {
                        return err(
                            span,
                            format!("unknown column `{name}`; columns: {}", self.schema.names()),
                        )
                    }
                }
            }
        };
        let ty = self.schema.column(index).map(|c| c.data_type.clone());
        match ty {
            Some(ty) => Ok(Typed::new(Node::Column(index), ty)),
            None => err(span, format!("unknown column `{name}`")),
        }
    }

    fn boolean(&self, expr: &ast::Expr, outer: Span, what: &str) -> R<Typed> {
        let span = span_or(expr, outer);
        let t = self.compile(expr, span)?;
        let name = t.type_name();
        coerce(t, DataType::Boolean)
            .ok_or_else(|| ExprError::new(span, format!("{what} needs a BOOLEAN operand, found {name}")))
    }

    fn string_arg(&self, expr: &ast::Expr, outer: Span, what: &str) -> R<Typed> {
        let span = span_or(expr, outer);
        let t = self.compile(expr, span)?;
        let name = t.type_name();
        coerce(t, DataType::String)
            .ok_or_else(|| ExprError::new(span, format!("{what} needs a STRING argument, found {name}")))
    }

    fn integer_arg(&self, expr: &ast::Expr, outer: Span, what: &str) -> R<Typed> {
        let span = span_or(expr, outer);
        let t = self.compile(expr, span)?;
        if matches!(t.ty, Some(DataType::Int) | Some(DataType::BigInt) | None) {
            if let Some(t) = coerce(t, DataType::BigInt) {
                return Ok(t);
            }
            return err(span, format!("{what} needs an integer position"));
        }
        err(span, format!("{what} needs an INT or BIGINT position, found {}", t.type_name()))
    }

    fn binary(
        &self,
        expr: &ast::Expr,
        left: &ast::Expr,
        op: &BinaryOperator,
        right: &ast::Expr,
        span: Span,
    ) -> R<Typed> {
        use BinaryOperator as B;
        match op {
            B::And | B::Or => {
                let is_and = matches!(op, B::And);
                let what = if is_and { "AND" } else { "OR" };
                // A chain `a AND b AND c ...` is a left-deep tree: walk it without recursing
                // and compile it as a balanced one (same result: AND and OR are associative).
                let mut operands = vec![right];
                let mut at = left;
                loop {
                    match at {
                        ast::Expr::BinaryOp { left: l, op: o, right: r } if o == op => {
                            operands.push(r);
                            at = l;
                        }
                        _ => break,
                    }
                }
                operands.push(at);
                operands.reverse();
                let mut compiled = Vec::with_capacity(operands.len());
                for o in operands {
                    compiled.push(self.boolean(o, span, what)?);
                }
                Ok(balanced(compiled, is_and).unwrap_or(Typed::null()))
            }
            B::Eq | B::NotEq | B::Lt | B::LtEq | B::Gt | B::GtEq => {
                let cmp = match op {
                    B::Eq => CmpOp::Eq,
                    B::NotEq => CmpOp::Ne,
                    B::Lt => CmpOp::Lt,
                    B::LtEq => CmpOp::Le,
                    B::Gt => CmpOp::Gt,
                    _ => CmpOp::Ge,
                };
                let l = self.compile(left, span)?;
                let r = self.compile(right, span)?;
                if matches!(l.node, Node::Null) || matches!(r.node, Node::Null) {
                    return err(span, "a comparison with NULL is never true; use IS NULL or IS NOT NULL");
                }
                compare(l, r, cmp, span)
            }
            B::Plus | B::Minus | B::Multiply | B::Divide | B::Modulo => {
                let arith = match op {
                    B::Plus => ArithOp::Add,
                    B::Minus => ArithOp::Sub,
                    B::Multiply => ArithOp::Mul,
                    B::Divide => ArithOp::Div,
                    _ => ArithOp::Rem,
                };
                let l = self.compile(left, span)?;
                let r = self.compile(right, span)?;
                let bad = |t: &Typed| t.ty.is_some() && !is_numeric(t.ty.as_ref());
                if bad(&l) || bad(&r) {
                    return err(
                        span,
                        format!("operator {op} needs numbers, found {} and {}", l.type_name(), r.type_name()),
                    );
                }
                let Ok(Some(ty)) = unify([l.ty.clone(), r.ty.clone()]) else {
                    // NULL op NULL: a null of no particular type.
                    return Ok(Typed::null());
                };
                let (Some(l), Some(r)) = (coerce(l, ty.clone()), coerce(r, ty.clone())) else {
                    return err(span, format!("operator {op} needs numbers"));
                };
                let text = expr.to_string();
                Ok(Typed::new(Node::Arith { op: arith, left: l.boxed(), right: r.boxed(), text }, ty))
            }
            B::StringConcat => {
                let l = self.string_arg(left, span, "||")?;
                let r = self.string_arg(right, span, "||")?;
                Ok(Typed::new(Node::Concat(vec![l, r]), DataType::String))
            }
            other => err(span, format!("operator {other} is not supported")),
        }
    }

    fn like(
        &self,
        input: &ast::Expr,
        pattern: &ast::Expr,
        escape: Option<&ast::Expr>,
        negated: bool,
        span: Span,
    ) -> R<Typed> {
        let s = self.string_arg(input, span, "LIKE")?;
        let p = self.string_arg(pattern, span, "LIKE")?;
        // Arrow's LIKE treats `\` as an escape; SQL has none unless ESCAPE names one. A literal
        // pattern is rewritten into Arrow's form here.
        let escape = match escape {
            None => None,
            Some(e) => {
                let e_span = span_or(e, span);
                let c = self.compile(e, e_span)?;
                let text = c
                    .literal()
                    .and_then(|a| arrow_array::cast::AsArray::as_string_opt::<i32>(a.as_ref()))
                    .filter(|a| arrow_array::Array::is_valid(*a, 0))
                    .map(|a| a.value(0).to_string());
                let mut chars = text.as_deref().unwrap_or("").chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => Some(c),
                    _ => return err(e_span, "ESCAPE takes a string of one character"),
                }
            }
        };
        let p = match p.literal().and_then(|a| arrow_array::cast::AsArray::as_string_opt::<i32>(a.as_ref())) {
            Some(a) if arrow_array::Array::is_valid(a, 0) => {
                let rewritten = arrow_pattern(a.value(0), escape)
                    .map_err(|reason| ExprError::new(span_or(pattern, span), reason))?;
                literal(Arc::new(StringArray::from(vec![rewritten])), DataType::String)
            }
            _ if escape.is_some() => return err(span, "LIKE ... ESCAPE needs a literal pattern"),
            _ => p,
        };
        Ok(Typed::new(Node::Like { input: s.boxed(), pattern: p.boxed(), negated }, DataType::Boolean))
    }

    fn cast(&self, input: Typed, to: DataType, safe: bool, expr: &ast::Expr, span: Span) -> R<Typed> {
        let Some(from) = input.ty.clone() else {
            return Ok(coerce(input, to.clone()).unwrap_or(Typed::null()));
        };
        if from == to {
            return Ok(input);
        }
        let custom = matches!(
            (&from, &to),
            (DataType::String, DataType::Timestamp) | (DataType::Timestamp, DataType::String)
        );
        let castable = from != DataType::Map
            && to != DataType::Map
            && (custom || arrow_cast::can_cast_types(&arrow_type(&from), &arrow_type(&to)));
        if !castable {
            return err(span, format!("cannot CAST {from} to {to}"));
        }
        let is_literal = input.literal().is_some();
        let node = Typed::new(Node::Cast { input: input.boxed(), safe, text: expr.to_string() }, to.clone());
        if !is_literal {
            return Ok(node);
        }
        // A constant: convert it once, now (a bad value is an error of the expression).
        let ctx = Ctx::constant();
        match eval(&node, &ctx) {
            Ok(Val::Scalar(a)) | Ok(Val::Array(a)) => Ok(literal(a, to)),
            Err(e) => err(span, e.to_string()),
        }
    }

    fn case(
        &self,
        operand: Option<&ast::Expr>,
        conditions: &[ast::CaseWhen],
        otherwise: Option<&ast::Expr>,
        span: Span,
    ) -> R<Typed> {
        let operand = match operand {
            Some(o) => Some(self.compile(o, span)?),
            None => None,
        };
        let mut whens = Vec::with_capacity(conditions.len());
        for w in conditions {
            let c_span = span_or(&w.condition, span);
            let cond = match &operand {
                Some(x) => {
                    let v = self.compile(&w.condition, c_span)?;
                    compare(x.clone(), v, CmpOp::Eq, c_span)?
                }
                None => self.boolean(&w.condition, c_span, "WHEN")?,
            };
            let r_span = span_or(&w.result, span);
            whens.push((cond, self.compile(&w.result, r_span)?, r_span));
        }
        let otherwise = match otherwise {
            Some(e) => {
                let e_span = span_or(e, span);
                Some((self.compile(e, e_span)?, e_span))
            }
            None => None,
        };
        let types =
            whens.iter().map(|(_, r, _)| r.ty.clone()).chain(otherwise.iter().map(|(o, _)| o.ty.clone()));
        let ty = match unify(types) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(Typed::null()),
            Err((a, b)) => return err(span, format!("CASE results have different types: {a} and {b}")),
        };
        let fit = |t: Typed, s: Span| {
            let name = t.type_name();
            coerce(t, ty.clone()).ok_or_else(|| ExprError::new(s, format!("CASE result is {name}, not {ty}")))
        };
        let mut out = Vec::with_capacity(whens.len());
        for (c, r, s) in whens {
            out.push((c, fit(r, s)?));
        }
        let otherwise = match otherwise {
            Some((o, s)) => Some(fit(o, s)?.boxed()),
            None => None,
        };
        Ok(Typed::new(Node::Case { whens: out, otherwise }, ty))
    }

    fn function(&self, expr: &ast::Expr, f: &ast::Function, span: Span) -> R<Typed> {
        let name = match f.name.0.as_slice() {
            [part] => part.as_ident().map(|i| i.value.to_ascii_uppercase()),
            _ => None,
        };
        let Some(name) = name else {
            return err(span, format!("unknown function {}", f.name));
        };
        if f.over.is_some() {
            return err(span, format!("window function {name}(...) OVER is not supported"));
        }
        if AGGREGATES.contains(&name.as_str()) {
            return err(span, format!("aggregate function {name} is not supported"));
        }
        if WINDOW_FUNCTIONS.contains(&name.as_str()) {
            return err(span, format!("window function {name} is not supported"));
        }
        if f.filter.is_some() || !f.within_group.is_empty() || f.null_treatment.is_some() {
            return err(span, format!("`{expr}` is not supported"));
        }
        let args: Vec<&ast::Expr> = match &f.args {
            FunctionArguments::None => Vec::new(),
            FunctionArguments::Subquery(_) => return err(span, "subqueries are not supported"),
            FunctionArguments::List(list) => {
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    return err(span, format!("`{expr}` is not supported"));
                }
                let mut out = Vec::with_capacity(list.args.len());
                for a in &list.args {
                    match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => out.push(e),
                        _ => return err(span, format!("argument `{a}` of {name} is not supported")),
                    }
                }
                out
            }
        };
        let arity = |n: usize| -> R<()> {
            if args.len() == n {
                Ok(())
            } else {
                let s = if n == 1 { "" } else { "s" };
                err(span, format!("{name} takes {n} argument{s}, found {}", args.len()))
            }
        };
        match name.as_str() {
            "UPPER" | "LOWER" => {
                arity(1)?;
                let s = self.string_arg(args[0], span, &name)?.boxed();
                let node = if name == "UPPER" { Node::Upper(s) } else { Node::Lower(s) };
                Ok(Typed::new(node, DataType::String))
            }
            "CHAR_LENGTH" | "CHARACTER_LENGTH" => {
                arity(1)?;
                let s = self.string_arg(args[0], span, &name)?;
                Ok(Typed::new(Node::CharLength(s.boxed()), DataType::Int))
            }
            "CONCAT" => {
                if args.is_empty() {
                    return err(span, "CONCAT takes at least 1 argument");
                }
                let mut list = Vec::with_capacity(args.len());
                for a in &args {
                    list.push(self.string_arg(a, span, "CONCAT")?);
                }
                Ok(Typed::new(Node::Concat(list), DataType::String))
            }
            "COALESCE" => {
                if args.is_empty() {
                    return err(span, "COALESCE takes at least 1 argument");
                }
                let mut list = Vec::with_capacity(args.len());
                for a in &args {
                    list.push(self.compile(a, span_or(a, span))?);
                }
                let ty = match unify(list.iter().map(|t| t.ty.clone())) {
                    Ok(Some(t)) => t,
                    Ok(None) => return Ok(Typed::null()),
                    Err((a, b)) => {
                        return err(span, format!("COALESCE arguments have different types: {a} and {b}"))
                    }
                };
                let list = list.into_iter().filter_map(|t| coerce(t, ty.clone())).collect();
                Ok(Typed::new(Node::Coalesce(list), ty))
            }
            "NULLIF" => {
                arity(2)?;
                let a = self.compile(args[0], span_or(args[0], span))?;
                let b = self.compile(args[1], span_or(args[1], span))?;
                let Some(ty) = a.ty.clone().or(b.ty.clone()) else { return Ok(Typed::null()) };
                let ty = unify([a.ty.clone(), b.ty.clone()]).ok().flatten().unwrap_or(ty);
                let eq = compare(a.clone(), b, CmpOp::Eq, span)?;
                let Some(a) = coerce(a, ty.clone()) else {
                    return err(span, "NULLIF arguments have different types");
                };
                let null = literal(new_null_array(&arrow_type(&ty), 1), ty.clone());
                Ok(Typed::new(Node::Case { whens: vec![(eq, null)], otherwise: Some(a.boxed()) }, ty))
            }
            "IF" => {
                arity(3)?;
                let c = self.boolean(args[0], span, "IF")?;
                let a = self.compile(args[1], span_or(args[1], span))?;
                let b = self.compile(args[2], span_or(args[2], span))?;
                let ty = match unify([a.ty.clone(), b.ty.clone()]) {
                    Ok(Some(t)) => t,
                    Ok(None) => return Ok(Typed::null()),
                    Err((x, y)) => return err(span, format!("IF results have different types: {x} and {y}")),
                };
                let (Some(a), Some(b)) = (coerce(a, ty.clone()), coerce(b, ty.clone())) else {
                    return err(span, "IF results have different types");
                };
                Ok(Typed::new(Node::Case { whens: vec![(c, a)], otherwise: Some(b.boxed()) }, ty))
            }
            "JSON_VALUE" => {
                arity(2)?;
                let s = self.string_arg(args[0], span, "JSON_VALUE")?;
                let p_span = span_or(args[1], span);
                let p = self.compile(args[1], p_span)?;
                let text = p
                    .literal()
                    .and_then(|a| arrow_array::cast::AsArray::as_string_opt::<i32>(a.as_ref()))
                    .filter(|a| arrow_array::Array::is_valid(*a, 0))
                    .map(|a| a.value(0).to_string());
                let Some(text) = text else {
                    return err(p_span, "JSON_VALUE needs a literal path like '$.a.b'");
                };
                let path = json_path(&text).map_err(|r| ExprError::new(p_span, r))?;
                Ok(Typed::new(Node::JsonValue { input: s.boxed(), path }, DataType::String))
            }
            "SUBSTRING" | "SUBSTR" => {
                if args.len() != 2 && args.len() != 3 {
                    return err(span, format!("{name} takes 2 or 3 arguments, found {}", args.len()));
                }
                let s = self.string_arg(args[0], span, &name)?;
                let from = self.integer_arg(args[1], span, &name)?;
                let len = match args.get(2) {
                    Some(n) => Some(self.integer_arg(n, span, &name)?.boxed()),
                    None => None,
                };
                Ok(Typed::new(
                    Node::Substring { input: s.boxed(), from: from.boxed(), len },
                    DataType::String,
                ))
            }
            _ => err(span, format!("unknown function {name}")),
        }
    }
}

/// `items` joined by AND (`is_and`) or OR as a balanced tree (its depth is the log of their
/// number); `None` when there are none.
fn balanced(mut items: Vec<Typed>, is_and: bool) -> Option<Typed> {
    while items.len() > 1 {
        let mut next = Vec::with_capacity(items.len().div_ceil(2));
        let mut it = items.into_iter();
        while let Some(a) = it.next() {
            next.push(match it.next() {
                Some(b) if is_and => Typed::new(Node::And(a.boxed(), b.boxed()), DataType::Boolean),
                Some(b) => Typed::new(Node::Or(a.boxed(), b.boxed()), DataType::Boolean),
                None => a,
            });
        }
        items = next;
    }
    items.pop()
}

fn not_if(t: Typed, negated: bool) -> Typed {
    if negated {
        Typed::new(Node::Not(t.boxed()), DataType::Boolean)
    } else {
        t
    }
}

/// A comparison, with its operands brought to one type: numbers promote, NULL takes the other
/// side's type, a string or integer literal compared with a TIMESTAMP is read as a timestamp.
fn compare(l: Typed, r: Typed, op: CmpOp, span: Span) -> R<Typed> {
    let (l, r) = match (l.ty.clone(), r.ty.clone()) {
        (None, None) => {
            let b = DataType::Boolean;
            (coerce(l, b.clone()), coerce(r, b.clone()))
        }
        (Some(t), None) => (Some(l), coerce(r, t.clone())),
        (None, Some(t)) => (coerce(l, t.clone()), Some(r)),
        (Some(DataType::Timestamp), Some(_)) => {
            let r = timestamp_literal(r, span)?;
            (Some(l), Some(r))
        }
        (Some(_), Some(DataType::Timestamp)) => {
            let l = timestamp_literal(l, span)?;
            (Some(l), Some(r))
        }
        (Some(a), Some(b)) => match unify([Some(a.clone()), Some(b.clone())]) {
            Ok(Some(t)) => (coerce(l, t.clone()), coerce(r, t.clone())),
            _ => return err(span, format!("cannot compare {a} with {b}")),
        },
    };
    let (Some(l), Some(r)) = (l, r) else {
        return err(span, "cannot compare these values");
    };
    match l.ty {
        Some(DataType::Boolean) if !matches!(op, CmpOp::Eq | CmpOp::Ne) => {
            return err(span, "BOOLEAN compares with = and <> only");
        }
        Some(DataType::Map) => return err(span, "a MAP cannot be compared; use IS NULL / IS NOT NULL"),
        _ => {}
    }
    Ok(Typed::new(Node::Compare { op, left: l.boxed(), right: r.boxed() }, DataType::Boolean))
}

/// `t` as a TIMESTAMP: itself if it is one; a string literal parsed (UTC); an integer literal
/// read as epoch milliseconds.
fn timestamp_literal(t: Typed, span: Span) -> R<Typed> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    if t.ty == Some(DataType::Timestamp) {
        return Ok(t);
    }
    let name = t.type_name();
    let Some(a) = t.literal() else {
        return err(span, format!("cannot compare TIMESTAMP with {name}"));
    };
    let ms = if !a.is_valid(0) {
        None
    } else if let Some(s) = a.as_string_opt::<i32>() {
        let text = s.value(0);
        Some(crate::time::parse(text).ok_or_else(|| {
            ExprError::new(span, format!("'{text}' is not a timestamp like '2024-05-01 12:00:00'"))
        })?)
    } else if let Some(i) = a.as_primitive_opt::<arrow_array::types::Int32Type>() {
        Some(i64::from(i.value(0)))
    } else if let Some(i) = a.as_primitive_opt::<arrow_array::types::Int64Type>() {
        Some(i.value(0))
    } else {
        return err(span, format!("cannot compare TIMESTAMP with {name}"));
    };
    Ok(literal(Arc::new(TimestampMillisecondArray::from(vec![ms])), DataType::Timestamp))
}

/// A literal value; `negate` for a number under a unary minus.
fn value_literal(v: &Value, negate: bool, span: Span) -> R<Typed> {
    match v {
        Value::Number(text, long) => {
            let text = if negate { format!("-{text}") } else { text.clone() };
            let integral = !text.contains(['.', 'e', 'E']);
            if integral {
                let Ok(i) = text.parse::<i64>() else {
                    return err(span, format!("integer {text} is out of range for BIGINT"));
                };
                return Ok(match i32::try_from(i) {
                    Ok(small) if !long => literal(Arc::new(Int32Array::from(vec![small])), DataType::Int),
                    _ => literal(Arc::new(Int64Array::from(vec![i])), DataType::BigInt),
                });
            }
            match text.parse::<f64>() {
                Ok(d) if d.is_finite() => {
                    Ok(literal(Arc::new(Float64Array::from(vec![d])), DataType::Double))
                }
                _ => err(span, format!("{text} is not a finite number")),
            }
        }
        Value::SingleQuotedString(s) => {
            Ok(literal(Arc::new(StringArray::from(vec![s.as_str()])), DataType::String))
        }
        Value::Boolean(b) => Ok(literal(Arc::new(BooleanArray::from(vec![*b])), DataType::Boolean)),
        Value::Null => Ok(Typed::null()),
        other => err(span, format!("literal {other} is not supported")),
    }
}

/// Rewrites a SQL LIKE pattern (with `escape` as its escape character, if any) into Arrow's
/// form, where `\` escapes.
fn arrow_pattern(pattern: &str, escape: Option<char>) -> Result<String, String> {
    let mut out = String::with_capacity(pattern.len() + 4);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if Some(c) == escape {
            match chars.next() {
                Some(n @ ('%' | '_' | '\\')) => {
                    out.push('\\');
                    out.push(n);
                }
                Some(n) if Some(n) == escape => out.push(n),
                Some(n) => return Err(format!("LIKE pattern: escape character before '{n}', not % or _")),
                None => return Err("LIKE pattern ends with the escape character".into()),
            }
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses a JSON path: `$`, then `.key`, `['key']`, `["key"]` or `[index]` steps; an optional
/// `lax ` prefix (the default mode).
pub(super) fn json_path(text: &str) -> Result<Vec<PathStep>, String> {
    let bad =
        |why: &str| format!("JSON path '{text}': {why}; write it like '$.a.b', '$.a[0]' or '$[''a b'']'");
    let mut rest = text.trim();
    if let Some(r) = rest.strip_prefix("lax ") {
        rest = r.trim_start();
    } else if rest.starts_with("strict ") {
        return Err(bad("strict mode is not supported"));
    }
    let Some(mut rest) = rest.strip_prefix('$') else { return Err(bad("it must start with $")) };
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            if key.is_empty() {
                return Err(bad("empty key after '.'"));
            }
            steps.push(PathStep::Key(key.to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(close) = r.find(']') else { return Err(bad("missing ]")) };
            let inner = r[..close].trim();
            let quoted = inner
                .strip_prefix('\'')
                .and_then(|s| s.strip_suffix('\''))
                .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')));
            if let Some(key) = quoted {
                steps.push(PathStep::Key(key.to_string()));
            } else if let Ok(i) = inner.parse::<usize>() {
                steps.push(PathStep::Index(i));
            } else {
                return Err(bad("a [...] step takes an index or a quoted key"));
            }
            rest = &r[close + 1..];
        } else {
            return Err(bad("expected '.' or '['"));
        }
    }
    Ok(steps)
}
