//! Parsing expression text with sqlparser, and the error type of the expression engine.

use std::fmt;

use sqlparser::ast::{self, Ident, SelectItem};
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Span, Token};

use super::dialect::FlinkDialect;
use crate::schema::DataType;

/// An error in an expression: what is wrong, and where (a span of the text the expression was
/// parsed from; [`Span::empty`] when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    pub span: Span,
    pub reason: String,
}

impl ExprError {
    pub fn new(span: Span, reason: impl Into<String>) -> ExprError {
        ExprError { span, reason: reason.into() }
    }

    /// As a spec error of `field`: `KeelError::InvalidSpec` with this error's text (reason and
    /// position) as the reason.
    pub fn to_spec_error(&self, field: &str) -> keel_proto::KeelError {
        keel_proto::KeelError::invalid_spec(field, self.to_string())
    }

    /// The position as text: ` (at column N)` on the first line, ` (at line L, column N)`
    /// after it, nothing when unknown.
    pub fn position(&self) -> String {
        let Location { line, column } = self.span.start;
        match line {
            0 => String::new(),
            1 => format!(" (at column {column})"),
            _ => format!(" (at line {line}, column {column})"),
        }
    }
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.reason, self.position())
    }
}

impl std::error::Error for ExprError {}

/// A sqlparser error as an [`ExprError`]: the message without its `sql parser error: ` prefix,
/// and its ` at Line: L, Column: C` suffix moved into the span.
fn parser_error(e: ParserError) -> ExprError {
    let text = match e {
        ParserError::TokenizerError(s) | ParserError::ParserError(s) => s,
        ParserError::RecursionLimitExceeded => {
            return ExprError::new(Span::empty(), "the expression is nested too deeply")
        }
    };
    if let Some(at) = text.rfind(" at Line: ") {
        let tail = &text[at + " at Line: ".len()..];
        if let Some((line, column)) = tail.split_once(", Column: ") {
            if let (Ok(line), Ok(column)) = (line.trim().parse::<u64>(), column.trim().parse::<u64>()) {
                let loc = Location::new(line, column);
                return ExprError::new(Span::new(loc, loc), text[..at].to_string());
            }
        }
    }
    ExprError::new(Span::empty(), text)
}

/// [`parser_error`], with an error at the end of the text placed there.
fn text_error(e: ParserError, text: &str) -> ExprError {
    let mut e = parser_error(e);
    if e.span == Span::empty() && e.reason.ends_with("found: EOF") {
        let line = text.split('\n').count().max(1) as u64;
        let column = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
        let end = Location::new(line, column);
        e.span = Span::new(end, end);
        e.reason = format!("{}the end", e.reason.trim_end_matches("EOF"));
    }
    e
}

fn parser(text: &str) -> Result<Parser<'static>, ExprError> {
    static DIALECT: FlinkDialect = FlinkDialect;
    Parser::new(&DIALECT).try_with_sql(text).map_err(parser_error)
}

/// Fails unless the parser is at the end of the text.
fn expect_end(parser: &Parser<'_>, what: &str) -> Result<(), ExprError> {
    let next = parser.peek_token();
    if next.token == Token::EOF {
        return Ok(());
    }
    Err(ExprError::new(next.span, format!("unexpected {} after the {what}", next.token)))
}

/// The longest expression text taken (its syntax tree can be as deep as it is long).
pub const MAX_TEXT: usize = 64 * 1024;

fn check_length(text: &str) -> Result<(), ExprError> {
    if text.len() > MAX_TEXT {
        return Err(ExprError::new(
            Span::empty(),
            format!("the expression is {} bytes long; at most {MAX_TEXT} are taken", text.len()),
        ));
    }
    Ok(())
}

/// Parses one SQL expression (the whole of `text`, at most [`MAX_TEXT`] bytes).
pub fn parse_expr(text: &str) -> Result<ast::Expr, ExprError> {
    check_length(text)?;
    super::with_deep_stack(|| parse_expr_here(text))
}

fn parse_expr_here(text: &str) -> Result<ast::Expr, ExprError> {
    let mut p = parser(text)?;
    if p.peek_token().token == Token::EOF {
        return Err(ExprError::new(Span::empty(), "empty expression"));
    }
    let expr = p.parse_expr().map_err(|e| text_error(e, text))?;
    expect_end(&p, "expression")?;
    Ok(expr)
}

/// Parses one item of a select list, `<expr> [AS] <alias>` (the whole of `text`, at most
/// [`MAX_TEXT`] bytes).
pub fn parse_select_item(text: &str) -> Result<(ast::Expr, Option<Ident>), ExprError> {
    check_length(text)?;
    super::with_deep_stack(|| parse_select_item_here(text))
}

fn parse_select_item_here(text: &str) -> Result<(ast::Expr, Option<Ident>), ExprError> {
    let mut p = parser(text)?;
    if p.peek_token().token == Token::EOF {
        return Err(ExprError::new(Span::empty(), "empty select item"));
    }
    let item = p.parse_select_item().map_err(|e| text_error(e, text))?;
    expect_end(&p, "select item")?;
    match item {
        SelectItem::UnnamedExpr(e) => Ok((e, None)),
        SelectItem::ExprWithAlias { expr, alias } => Ok((expr, Some(alias))),
        SelectItem::ExprWithAliases { expr, .. } => Err(ExprError::new(
            sqlparser::ast::Spanned::span(&expr),
            "a list of aliases is not supported; give one name with AS",
        )),
        SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
            Err(ExprError::new(Span::empty(), "`*` is not supported here; list the columns"))
        }
    }
}

/// The Keel type of a SQL type name: STRING, VARCHAR[(n)], CHAR(n), INT, INTEGER, BIGINT,
/// BOOLEAN, DOUBLE, TIMESTAMP[(p)] [WITHOUT TIME ZONE] and TIMESTAMP_LTZ[(p)] with p <= 3
/// (milliseconds), BYTES, VARBINARY[(n)], DATE, DECIMAL[(p[, s])] (NUMERIC, DEC), and the other
/// names `DataType::parse` takes. `None` for any other type (the caller names it).
pub fn sql_type(t: &ast::DataType) -> Option<DataType> {
    use ast::DataType as T;
    let precision_ok = |p: &Option<u64>| p.is_none_or(|p| p <= 3);
    match t {
        T::String(_) | T::Varchar(_) | T::Char(_) | T::Character(_) | T::CharacterVarying(_) => {
            Some(DataType::String)
        }
        T::Int(None) | T::Integer(None) => Some(DataType::Int),
        T::BigInt(None) => Some(DataType::BigInt),
        T::Boolean | T::Bool => Some(DataType::Boolean),
        T::Double(ast::ExactNumberInfo::None) | T::DoublePrecision => Some(DataType::Double),
        T::Timestamp(p, ast::TimezoneInfo::None | ast::TimezoneInfo::WithoutTimeZone) if precision_ok(p) => {
            Some(DataType::Timestamp)
        }
        T::Bytes(None) | T::Varbinary(_) => Some(DataType::Bytes),
        T::Custom(name, modifiers) => {
            let [part] = name.0.as_slice() else { return None };
            let ident = part.as_ident()?;
            if !ident.value.eq_ignore_ascii_case("TIMESTAMP_LTZ") {
                return None;
            }
            match modifiers.as_slice() {
                [] => Some(DataType::Timestamp),
                [ast::TypeModifier::Number(n, false)] if n.parse::<u64>().is_ok_and(|p| p <= 3) => {
                    Some(DataType::Timestamp)
                }
                _ => None,
            }
        }
        // DATE, DECIMAL(p, s) / NUMERIC / DEC, and any other name a column type may have.
        other => DataType::parse(&other.to_string()),
    }
}
