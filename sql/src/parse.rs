//! The statement level of a Flink SQL script: `SET`, `CREATE [TEMPORARY] TABLE ... WITH (...)`,
//! `INSERT INTO ... SELECT` and `EXECUTE STATEMENT SET BEGIN ... END`.
//!
//! sqlparser parses the pieces (identifiers, data types, expressions, whole `INSERT` statements);
//! this module drives it through the statements, because none of its dialects takes Flink's table
//! DDL (`METADATA [FROM 'key'] [VIRTUAL]` columns, computed columns `c AS expr`, `WATERMARK FOR`,
//! `MAP<...>`, `PRIMARY KEY ... NOT ENFORCED`) or statement sets. Its syntax tree has no nodes for
//! them either, so the result is this module's own [`Script`], not a sqlparser `Statement`.

use keel_formats::DataType;
use keel_proto::{KeelError, Result};
use sqlparser::ast::{self, Spanned};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Span, Token, TokenWithSpan, Tokenizer};

/// The dialect scripts are parsed with, the one the spec's expressions are parsed with too:
/// Flink's expressions, backquoted identifiers and `!=`; everything Flink-specific at the
/// statement level is parsed here.
pub(crate) const DIALECT: keel_formats::FlinkDialect = keel_formats::FlinkDialect;

/// A parsed script, in statement order within each kind.
#[derive(Debug, Default)]
pub(crate) struct Script {
    /// Every token of the script with its position, to find a clause's keyword (sqlparser's
    /// spans cover a clause's expressions, not its keyword).
    pub tokens: Vec<TokenWithSpan>,
    pub sets: Vec<SetStmt>,
    pub tables: Vec<TableDef>,
    pub inserts: Vec<InsertStmt>,
}

/// `SET 'key' = 'value'`.
#[derive(Debug)]
pub(crate) struct SetStmt {
    pub key: String,
    pub value: String,
    pub span: Span,
}

/// `CREATE [TEMPORARY] TABLE name (columns) WITH (options)`.
#[derive(Debug)]
pub(crate) struct TableDef {
    pub name: String,
    pub span: Span,
    pub columns: Vec<ColumnDecl>,
    pub options: Vec<OptionDecl>,
    /// `WATERMARK FOR column AS expr`: checked, then ignored (Keel has no event-time operator).
    pub watermark: Option<(String, Span)>,
}

#[derive(Debug)]
pub(crate) struct ColumnDecl {
    pub name: String,
    pub span: Span,
    pub kind: ColumnKind,
}

#[derive(Debug)]
pub(crate) enum ColumnKind {
    /// Part of the message key or value.
    Physical { data_type: DataType },
    /// `METADATA [FROM 'key'] [VIRTUAL]`: part of the Kafka record around the message.
    Metadata { data_type: DataType, key: String, key_span: Span, is_virtual: bool },
    /// `name AS expr`: computed from the other columns when read; never written.
    Computed(Box<ast::Expr>),
}

/// One `'key' = 'value'` of a `WITH (...)` clause.
#[derive(Debug)]
pub(crate) struct OptionDecl {
    pub key: String,
    pub value: String,
    pub span: Span,
}

/// `INSERT INTO sink [(columns)] <query>`.
#[derive(Debug)]
pub(crate) struct InsertStmt {
    pub sink: ast::Ident,
    pub columns: Vec<ast::Ident>,
    pub query: Box<ast::Query>,
    pub span: Span,
}

/// `line L, column C` of a span's start.
pub(crate) fn at(span: Span) -> String {
    format!("line {}, column {}", span.start.line, span.start.column)
}

/// A SQL error: field `sql`, the reason naming what and where.
pub(crate) fn sql_error(reason: impl Into<String>) -> KeelError {
    KeelError::invalid_spec("sql", reason)
}

/// The span of the last keyword `word` (e.g. `GROUP`) at or before `before`: where the clause
/// whose contents start at `before` begins. `before` itself when there is none.
pub(crate) fn keyword_at(tokens: &[TokenWithSpan], before: Span, word: &str) -> Span {
    let limit = (before.start.line, before.start.column);
    tokens
        .iter()
        .take_while(|t| (t.span.start.line, t.span.start.column) <= limit)
        .filter(|t| word_is(t, word))
        .last()
        .map_or(before, |t| t.span)
}

fn syntax(e: ParserError) -> KeelError {
    let text = match e {
        ParserError::TokenizerError(s) | ParserError::ParserError(s) => s,
        ParserError::RecursionLimitExceeded => "the statement nests too deeply".to_string(),
    };
    sql_error(format!("syntax error: {text}"))
}

/// Parses a whole script.
pub(crate) fn parse_script(sql: &str) -> Result<Script> {
    let mut p = Parser::new(&DIALECT).try_with_sql(sql).map_err(syntax)?;
    let tokens = Tokenizer::new(&DIALECT, sql)
        .tokenize_with_location()
        .map_err(|e| sql_error(format!("syntax error: {e}")))?;
    let mut script = Script { tokens, ..Script::default() };
    loop {
        while p.consume_token(&Token::SemiColon) {}
        let tok = p.peek_token();
        match &tok.token {
            Token::EOF => break,
            Token::Word(w) => match w.keyword {
                Keyword::SET => {
                    p.next_token();
                    script.sets.push(parse_set(&mut p, tok.span)?);
                }
                Keyword::CREATE => script.tables.push(parse_create(&mut p)?),
                Keyword::INSERT => script.inserts.push(parse_insert(&mut p)?),
                Keyword::EXECUTE | Keyword::BEGIN => parse_statement_set(&mut p, &mut script)?,
                _ => return Err(unsupported_statement(&tok)),
            },
            _ => {
                return Err(sql_error(format!(
                    "expected a statement (SET, CREATE TABLE, INSERT INTO or EXECUTE STATEMENT SET) at {}, found {}",
                    at(tok.span),
                    tok.token
                )))
            }
        }
        end_of_statement(&mut p)?;
    }
    Ok(script)
}

fn end_of_statement(p: &mut Parser) -> Result<()> {
    let tok = p.peek_token();
    match tok.token {
        Token::SemiColon | Token::EOF => Ok(()),
        other => Err(sql_error(format!("expected ';' at {}, found {other}", at(tok.span)))),
    }
}

fn unsupported_statement(tok: &TokenWithSpan) -> KeelError {
    sql_error(format!(
        "{} ({}) is not supported: a script holds SET, CREATE [TEMPORARY] TABLE, INSERT INTO ... SELECT \
         and EXECUTE STATEMENT SET",
        tok.token.to_string().to_uppercase(),
        at(tok.span)
    ))
}

/// `SET 'key' = 'value'` (also `SET key = value` with a dotted key); `SET` is consumed.
fn parse_set(p: &mut Parser, span: Span) -> Result<SetStmt> {
    let key = match p.next_token() {
        TokenWithSpan { token: Token::SingleQuotedString(s), .. } => s,
        TokenWithSpan { token: Token::Word(w), .. } => {
            let mut key = w.value;
            while p.consume_token(&Token::Period) {
                let part = p.parse_identifier().map_err(syntax)?;
                key.push('.');
                key.push_str(&part.value);
            }
            key
        }
        other => {
            return Err(sql_error(format!(
                "SET ({}) needs 'key' = 'value', found {}",
                at(other.span),
                other.token
            )))
        }
    };
    p.expect_token(&Token::Eq).map_err(syntax)?;
    let value = match p.next_token() {
        TokenWithSpan { token: Token::SingleQuotedString(s), .. } => s,
        TokenWithSpan { token: Token::Number(n, _), .. } => n,
        TokenWithSpan { token: Token::Word(w), .. } => w.value,
        other => {
            return Err(sql_error(format!(
                "SET '{key}' ({}) needs a value in quotes, found {}",
                at(other.span),
                other.token
            )))
        }
    };
    Ok(SetStmt { key, value, span })
}

fn word_is(tok: &TokenWithSpan, word: &str) -> bool {
    matches!(&tok.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// `CREATE [TEMPORARY] TABLE [IF NOT EXISTS] name (...) [COMMENT '...'] WITH (...)`.
fn parse_create(p: &mut Parser) -> Result<TableDef> {
    let create = p.next_token();
    let _ = p.parse_keyword(Keyword::TEMPORARY);
    if !p.parse_keyword(Keyword::TABLE) {
        let what = p.peek_token();
        return Err(sql_error(format!(
            "CREATE {} ({}) is not supported: only CREATE [TEMPORARY] TABLE",
            what.token.to_string().to_uppercase(),
            at(create.span)
        )));
    }
    let _ = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name_tok = p.peek_token();
    let name = p.parse_object_name(false).map_err(syntax)?;
    let name = match name.0.as_slice() {
        [part] => part.as_ident().map(|i| i.value.clone()),
        _ => None,
    }
    .ok_or_else(|| {
        sql_error(format!(
            "table name {name} ({}) must be a single name: Keel has no catalogs or databases",
            at(name_tok.span)
        ))
    })?;
    let open = p.peek_token();
    if p.parse_keyword(Keyword::AS) || p.parse_keyword(Keyword::LIKE) {
        return Err(sql_error(format!(
            "CREATE TABLE {name} {} ({}) is not supported: declare the columns and the WITH options",
            open.token.to_string().to_uppercase(),
            at(open.span)
        )));
    }
    p.expect_token(&Token::LParen).map_err(syntax)?;
    let mut columns = Vec::new();
    let mut watermark = None;
    loop {
        let tok = p.peek_token();
        if word_is(&tok, "WATERMARK") {
            p.next_token();
            if !p.parse_keyword(Keyword::FOR) {
                return Err(sql_error(format!(
                    "WATERMARK ({}) needs FOR <column> AS <expression>",
                    at(tok.span)
                )));
            }
            let column = p.parse_identifier().map_err(syntax)?;
            p.expect_keyword_is(Keyword::AS).map_err(syntax)?;
            let _strategy = p.parse_expr().map_err(syntax)?;
            watermark = Some((column.value, tok.span));
        } else if matches!(&tok.token, Token::Word(w) if w.keyword == Keyword::PRIMARY || w.keyword == Keyword::CONSTRAINT)
        {
            return Err(primary_key_error(&name, tok.span));
        } else {
            columns.push(parse_column(p, &name)?);
        }
        if p.consume_token(&Token::Comma) {
            continue;
        }
        p.expect_token(&Token::RParen).map_err(syntax)?;
        break;
    }
    if p.parse_keyword(Keyword::COMMENT) {
        p.parse_literal_string().map_err(syntax)?;
    }
    let tok = p.peek_token();
    if p.parse_keyword(Keyword::PARTITIONED) {
        return Err(sql_error(format!(
            "PARTITIONED BY ({}) is not supported: Kafka tables have no partition columns",
            at(tok.span)
        )));
    }
    if !p.parse_keyword(Keyword::WITH) {
        return Err(sql_error(format!(
            "table {name} ({}) needs WITH ('connector' = '...', ...) after its columns, found {}",
            at(tok.span),
            tok.token
        )));
    }
    p.expect_token(&Token::LParen).map_err(syntax)?;
    let mut options: Vec<OptionDecl> = Vec::new();
    loop {
        let tok = p.next_token();
        let key = match tok.token {
            Token::SingleQuotedString(s) => s,
            Token::RParen if options.is_empty() => break,
            other => {
                return Err(sql_error(format!(
                    "table {name}: an option ({}) is written 'key' = 'value', found {other}",
                    at(tok.span)
                )))
            }
        };
        p.expect_token(&Token::Eq).map_err(syntax)?;
        let value_tok = p.next_token();
        let value = match value_tok.token {
            Token::SingleQuotedString(s) => s,
            other => {
                return Err(sql_error(format!(
                    "table {name}, option '{key}' ({}): the value must be a string in single quotes, found {other}",
                    at(value_tok.span)
                )))
            }
        };
        if let Some(first) = options.iter().find(|o| o.key == key) {
            return Err(sql_error(format!(
                "table {name}, option '{key}' ({}) is set twice (first at {})",
                at(tok.span),
                at(first.span)
            )));
        }
        options.push(OptionDecl { key, value, span: tok.span });
        if p.consume_token(&Token::Comma) {
            continue;
        }
        p.expect_token(&Token::RParen).map_err(syntax)?;
        break;
    }
    let tok = p.peek_token();
    if p.parse_keyword(Keyword::LIKE) {
        return Err(sql_error(format!("CREATE TABLE ... LIKE ({}) is not supported", at(tok.span))));
    }
    Ok(TableDef { name, span: create.span, columns, options, watermark })
}

fn primary_key_error(table: &str, span: Span) -> KeelError {
    sql_error(format!(
        "PRIMARY KEY ({}) in table {table} is not supported: the kafka connector appends records and has no \
         key constraint (Flink's upsert-kafka is not available)",
        at(span)
    ))
}

/// `name type [NOT NULL] [METADATA [FROM 'key'] [VIRTUAL]] [COMMENT '...']` or `name AS expr`.
fn parse_column(p: &mut Parser, table: &str) -> Result<ColumnDecl> {
    let ident = p.parse_identifier().map_err(syntax)?;
    let (name, span) = (ident.value, ident.span);
    if p.parse_keyword(Keyword::AS) {
        let expr = p.parse_expr().map_err(syntax)?;
        if p.parse_keyword(Keyword::COMMENT) {
            p.parse_literal_string().map_err(syntax)?;
        }
        return Ok(ColumnDecl { name, span, kind: ColumnKind::Computed(Box::new(expr)) });
    }
    let data_type = parse_type(p, table, &name)?;
    let mut metadata = None;
    loop {
        let tok = p.peek_token();
        if p.parse_keywords(&[Keyword::NOT, Keyword::NULL]) || p.parse_keyword(Keyword::NULL) {
            // Nullability is not enforced: a NOT NULL column reads like any other.
            continue;
        }
        if p.parse_keyword(Keyword::METADATA) {
            let (key, key_span) = if p.parse_keyword(Keyword::FROM) {
                let key_tok = p.next_token();
                match key_tok.token {
                    Token::SingleQuotedString(s) => (s, key_tok.span),
                    other => {
                        return Err(sql_error(format!(
                            "table {table}, column {name}: METADATA FROM ({}) needs the key in quotes, found {other}",
                            at(key_tok.span)
                        )))
                    }
                }
            } else {
                (name.clone(), tok.span)
            };
            let is_virtual = p.parse_keyword(Keyword::VIRTUAL);
            metadata = Some((key, key_span, is_virtual));
            continue;
        }
        if p.parse_keyword(Keyword::COMMENT) {
            p.parse_literal_string().map_err(syntax)?;
            continue;
        }
        if matches!(&tok.token, Token::Word(w) if w.keyword == Keyword::PRIMARY) {
            return Err(primary_key_error(table, tok.span));
        }
        break;
    }
    let kind = match metadata {
        Some((key, key_span, is_virtual)) => ColumnKind::Metadata { data_type, key, key_span, is_virtual },
        None => ColumnKind::Physical { data_type },
    };
    Ok(ColumnDecl { name, span, kind })
}

/// A column type. `MAP<...>`, `ROW<...>` / `ROW(...)` (and `ARRAY<...>`, refused) are read
/// token by token, as sqlparser's generic dialect does not take them; the rest through
/// sqlparser's type parser.
/// Both end in `DataType::parse`, the same names and aliases a YAML spec accepts.
fn parse_type(p: &mut Parser, table: &str, column: &str) -> Result<DataType> {
    let start = p.peek_token();
    let next = p.peek_nth_token(1).token;
    let text = if ["MAP", "ROW", "ARRAY", "MULTISET"].iter().any(|w| word_is(&start, w))
        && (next == Token::Lt || (word_is(&start, "ROW") && next == Token::LParen))
    {
        let mut text = String::new();
        let mut depth = 0i32;
        let mut opened = false;
        loop {
            let tok = p.next_token();
            match &tok.token {
                Token::Lt | Token::LParen => {
                    depth += 1;
                    opened = true;
                }
                Token::Gt | Token::RParen => depth -= 1,
                Token::ShiftRight => depth -= 2,
                Token::EOF => {
                    return Err(sql_error(format!(
                        "table {table}, column {column}: the type ({}) is not closed with '>'",
                        at(start.span)
                    )))
                }
                _ => {}
            }
            if !text.is_empty()
                && matches!(tok.token, Token::Word(_))
                && text.ends_with(|c: char| c.is_alphanumeric())
            {
                text.push(' ');
            }
            text.push_str(&tok.token.to_string());
            if opened && depth <= 0 {
                break;
            }
        }
        text
    } else {
        let parsed = p.parse_data_type().map_err(syntax)?;
        if let Some(t) = keel_formats::expr::sql_type(&parsed) {
            return Ok(t);
        }
        parsed.to_string()
    };
    if word_is(&start, "ARRAY") || word_is(&start, "MULTISET") {
        return Err(sql_error(format!(
            "table {table}, column {column}: type {text} ({}) is not supported yet",
            at(start.span)
        )));
    }
    text.parse::<DataType>()
        .map_err(|reason| sql_error(format!("table {table}, column {column} ({}): {reason}", at(start.span))))
}

/// `INSERT INTO sink [(columns)] SELECT ...`, through sqlparser's own INSERT parser.
fn parse_insert(p: &mut Parser) -> Result<InsertStmt> {
    let first = p.peek_token();
    let statement = p.parse_statement().map_err(syntax)?;
    let span = first.span;
    let ast::Statement::Insert(insert) = statement else {
        return Err(unsupported_statement(&first));
    };
    let refuse = |what: &str| Err(sql_error(format!("INSERT ... {what} ({}) is not supported", at(span))));
    if insert.overwrite {
        return refuse("OVERWRITE");
    }
    if insert.partitioned.is_some() {
        return refuse("PARTITION");
    }
    if insert.on.is_some() || insert.returning.is_some() || !insert.assignments.is_empty() {
        return refuse("ON CONFLICT / RETURNING / SET");
    }
    let sink = match &insert.table {
        ast::TableObject::TableName(name) => match name.0.as_slice() {
            [part] => part.as_ident().cloned(),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| {
        sql_error(format!(
            "INSERT INTO {} ({}): the target must be a table created in this script, by its single name",
            insert.table,
            at(span)
        ))
    })?;
    let mut columns = Vec::with_capacity(insert.columns.len());
    for c in &insert.columns {
        match c.0.as_slice() {
            [part] => columns.push(part.as_ident().cloned().ok_or_else(|| {
                sql_error(format!("INSERT INTO {sink} ({}): column {c} is not a name", at(c.span())))
            })?),
            _ => {
                return Err(sql_error(format!(
                    "INSERT INTO {sink} ({}): column {c} is not a single name",
                    at(c.span())
                )))
            }
        }
    }
    let Some(query) = insert.source else {
        return Err(sql_error(format!("INSERT INTO {sink} ({}) needs a SELECT", at(span))));
    };
    Ok(InsertStmt { sink, columns, query, span })
}

/// `EXECUTE STATEMENT SET BEGIN <insert>; ... END` or `BEGIN STATEMENT SET; <insert>; ... END`.
fn parse_statement_set(p: &mut Parser, script: &mut Script) -> Result<()> {
    let first = p.next_token();
    let begin_first = matches!(&first.token, Token::Word(w) if w.keyword == Keyword::BEGIN);
    if !p.parse_keywords(&[Keyword::STATEMENT, Keyword::SET]) {
        return Err(unsupported_statement(&first));
    }
    if begin_first {
        p.expect_token(&Token::SemiColon).map_err(syntax)?;
    } else {
        p.expect_keyword_is(Keyword::BEGIN).map_err(syntax)?;
    }
    let mut count = 0;
    loop {
        while p.consume_token(&Token::SemiColon) {}
        let tok = p.peek_token();
        match &tok.token {
            Token::Word(w) if w.keyword == Keyword::END => {
                p.next_token();
                break;
            }
            Token::Word(w) if w.keyword == Keyword::INSERT => {
                script.inserts.push(parse_insert(p)?);
                count += 1;
                end_of_statement(p)?;
            }
            Token::EOF => {
                return Err(sql_error(format!(
                    "the STATEMENT SET that starts at {} has no END",
                    at(first.span)
                )))
            }
            _ => {
                return Err(sql_error(format!(
                    "a STATEMENT SET holds only INSERT INTO statements; found {} at {}",
                    tok.token,
                    at(tok.span)
                )))
            }
        }
    }
    if count == 0 {
        return Err(sql_error(format!("the STATEMENT SET at {} holds no INSERT INTO", at(first.span))));
    }
    Ok(())
}
