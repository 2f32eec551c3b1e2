//! A parsed [`Script`] becomes a [`JobSpec`]: the same spec a YAML file gives, so that checkpoints,
//! exactly-once, upgrades and metrics behave the same whichever way a job was written.
//!
//! - Every table read by an `INSERT ... SELECT ... FROM t` is a source named `t`; tables that no
//!   statement reads are not sources. A table read by several statements is one source.
//! - Every `INSERT INTO s` is a sink fed by its `FROM` table, named `s` (`s_2`, `s_3` when several
//!   statements write `s`). The SELECT list maps onto the target columns by position (the listed
//!   columns, else every column of `s` except computed and `VIRTUAL` metadata ones) and each item
//!   is named after its target column. `WHERE` is the sink's `filter`.
//! - One table can be read by one statement and written by another, as in Flink: a Kafka table's
//!   `scan.*` options apply only where it is read, its `sink.*` options only where it is written.
//! - Computed columns (`c AS expr`) are replaced by their expression wherever a statement uses
//!   them; `SELECT *` includes them.
//! - `SET 'pipeline.name'` names the job (else the file name); `SET 'parallelism.default'` and
//!   `SET 'pipeline.max-parallelism'` set the parallelism; every other `SET` is a job
//!   configuration key (`config:` in YAML).

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use keel_formats::{ColumnDef, MetadataKey};
use keel_proto::{KeelError, Result};
use keel_spec::{ConnectorSpec, JobSpec};
use sqlparser::ast::{self, Spanned};
use sqlparser::tokenizer::Span;

use crate::parse::{at, keyword_at, sql_error, ColumnKind, InsertStmt, Script, TableDef};

/// Where each spec field came from in the script, to put SQL positions on the spec's errors.
#[derive(Debug, Default)]
pub(crate) struct Origins {
    /// Per source: its table.
    sources: Vec<String>,
    /// Per sink: its table, the WHERE span, and each select item's span.
    sinks: Vec<(String, Option<Span>, Vec<Span>)>,
    /// `config.<key>` -> the SET.
    sets: BTreeMap<String, Span>,
}

/// A compiled script: the spec, and the positions of its parts.
pub(crate) struct Planned {
    pub spec: JobSpec,
    pub origins: Origins,
}

pub(crate) fn plan(script: &Script, default_name: &str) -> Result<Planned> {
    let mut tables: BTreeMap<&str, &TableDef> = BTreeMap::new();
    for t in &script.tables {
        if let Some(first) = tables.insert(&t.name, t) {
            return Err(sql_error(format!(
                "table {} ({}) is created twice (first at {})",
                t.name,
                at(t.span),
                at(first.span)
            )));
        }
        check_table(t)?;
    }

    let mut origins = Origins::default();
    let mut name = default_name.to_string();
    let mut parallelism = None;
    let mut max_parallelism = None;
    let mut config = BTreeMap::new();
    for s in &script.sets {
        match s.key.as_str() {
            "pipeline.name" => name = s.value.clone(),
            "parallelism.default" => parallelism = Some((s.value.clone(), s.span)),
            "pipeline.max-parallelism" => max_parallelism = Some((s.value.clone(), s.span)),
            _ => {
                origins.sets.insert(format!("config.{}", s.key), s.span);
                config.insert(s.key.clone(), s.value.clone());
            }
        }
    }
    let number = |v: Option<(String, Span)>, key: &str, default: u32| -> Result<u32> {
        match v {
            None => Ok(default),
            Some((text, span)) => text.trim().parse::<u32>().map_err(|_| {
                sql_error(format!("SET '{key}' ({}): '{text}' is not a whole number", at(span)))
            }),
        }
    };
    let parallelism = number(parallelism, "parallelism.default", 1)?;
    let max_parallelism =
        number(max_parallelism, "pipeline.max-parallelism", keel_spec::DEFAULT_MAX_PARALLELISM)?;

    if script.inserts.is_empty() {
        return Err(sql_error(
            "the script has no INSERT INTO ... SELECT: nothing would run (tables alone are declarations)",
        ));
    }
    let mut sources: Vec<ConnectorSpec> = Vec::new();
    let mut sinks: Vec<ConnectorSpec> = Vec::new();
    for insert in &script.inserts {
        let sink_table = lookup(&tables, &insert.sink.value, insert.sink.span)?;
        let query = Query::of(insert, &script.tokens)?;
        let source_table = lookup(&tables, &query.table, query.table_span)?;
        if !sources.iter().any(|s| s.name == source_table.name) {
            sources.push(source_spec(source_table)?);
            origins.sources.push(source_table.name.clone());
        }
        let targets = target_columns(sink_table, insert)?;
        let items = query.items(source_table)?;
        if items.len() != targets.len() {
            return Err(sql_error(format!(
                "INSERT INTO {} ({}): the SELECT gives {} column(s) but the target has {} ({})",
                sink_table.name,
                at(insert.span),
                items.len(),
                targets.len(),
                targets.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let input = input_schema(source_table)?;
        let mut select = Vec::with_capacity(items.len());
        let mut spans = Vec::with_capacity(items.len());
        for (j, ((expr, span), target)) in items.into_iter().zip(&targets).enumerate() {
            let what = || {
                format!("INSERT INTO {}, select item {} for column {}", sink_table.name, j + 1, target.name)
            };
            let text = typed_item(expr, span, &input, &target.def.data_type, &what)?;
            select.push(format!("{text} AS {}", quote(&target.name)));
            spans.push(span);
        }
        let filter = match &query.selection {
            Some(e) => {
                let rewritten = rewrite(e.clone(), source_table, &query.qualifiers)?;
                let what = || format!("the WHERE of INSERT INTO {}", sink_table.name);
                let compiled = compile_at(&rewritten, e.span(), &input, &what)?;
                if compiled.data_type() != keel_formats::DataType::Boolean {
                    return Err(sql_error(format!(
                        "{} ({}) must be a condition (BOOLEAN), not {}",
                        what(),
                        at(e.span()),
                        compiled.data_type()
                    )));
                }
                Some(rewritten.to_string())
            }
            None => None,
        };
        let writes = origins.sinks.iter().filter(|(t, _, _)| *t == sink_table.name).count();
        let sink_name =
            if writes == 0 { sink_table.name.clone() } else { format!("{}_{}", sink_table.name, writes + 1) };
        let (connector, mut options) = connector_options(sink_table);
        if connector == "kafka" {
            // One table may serve as source and sink (as in Flink): its scan options do not apply here.
            options.retain(|k, _| {
                !(k.starts_with("scan.") && keel_spec::connectors::KAFKA_SOURCE_OPTIONS.contains(&k.as_str()))
            });
        }
        let columns =
            if connector == "kafka" { targets.iter().map(|c| c.def.clone()).collect() } else { Vec::new() };
        sinks.push(ConnectorSpec {
            name: sink_name,
            connector,
            from: Some(source_table.name.clone()),
            options,
            columns,
            filter,
            select,
        });
        origins.sinks.push((sink_table.name.clone(), query.selection.as_ref().map(|e| e.span()), spans));
    }
    let spec = JobSpec { name, parallelism, max_parallelism, sources, sinks, config };
    Ok(Planned { spec, origins })
}

fn lookup<'a>(tables: &BTreeMap<&str, &'a TableDef>, name: &str, span: Span) -> Result<&'a TableDef> {
    tables.get(name).copied().ok_or_else(|| {
        let known = tables.keys().copied().collect::<Vec<_>>();
        sql_error(format!(
            "unknown table {name} ({}); tables created in this script: {}",
            at(span),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ))
    })
}

/// Names unique within the table, metadata keys known, the watermark on a column.
fn check_table(t: &TableDef) -> Result<()> {
    for (i, c) in t.columns.iter().enumerate() {
        if let Some(first) = t.columns[..i].iter().find(|o| o.name == c.name) {
            return Err(sql_error(format!(
                "table {}, column {} ({}) is declared twice (first at {})",
                t.name,
                c.name,
                at(c.span),
                at(first.span)
            )));
        }
        if let ColumnKind::Metadata { key, key_span, .. } = &c.kind {
            if MetadataKey::parse(key).is_none() {
                return Err(sql_error(format!(
                    "table {}, column {}: unknown metadata key '{key}' ({}); known: {}",
                    t.name,
                    c.name,
                    at(*key_span),
                    MetadataKey::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    if let Some((column, span)) = &t.watermark {
        if !t.columns.iter().any(|c| &c.name == column) {
            return Err(sql_error(format!(
                "table {}: WATERMARK FOR {column} ({}) names no column of the table",
                t.name,
                at(*span)
            )));
        }
    }
    if let Some(o) =
        t.options.iter().find(|o| keel_spec::ENTRY_KEYS.contains(&o.key.as_str()) && o.key != "connector")
    {
        return Err(sql_error(format!(
            "table {}, option '{}' ({}) is not a connector option",
            t.name,
            o.key,
            at(o.span)
        )));
    }
    if !t.options.iter().any(|o| o.key == "connector") {
        return Err(sql_error(format!(
            "table {} ({}) needs 'connector' in its WITH options (kafka, datagen, print, blackhole or file)",
            t.name,
            at(t.span)
        )));
    }
    Ok(())
}

/// The table's connector and its other options.
fn connector_options(t: &TableDef) -> (String, BTreeMap<String, String>) {
    let mut connector = String::new();
    let mut options = BTreeMap::new();
    for o in &t.options {
        if o.key == "connector" {
            connector = o.value.clone();
        } else {
            options.insert(o.key.clone(), o.value.clone());
        }
    }
    (connector, options)
}

/// A column as the spec declares it (physical or metadata; computed columns have none).
fn column_def(c: &crate::parse::ColumnDecl) -> Option<ColumnDef> {
    match &c.kind {
        ColumnKind::Physical { data_type } => Some(ColumnDef::new(&c.name, data_type.clone())),
        ColumnKind::Metadata { data_type, key, .. } => {
            MetadataKey::parse(key).map(|k| ColumnDef::metadata(&c.name, data_type.clone(), k))
        }
        ColumnKind::Computed(_) => None,
    }
}

fn source_spec(t: &TableDef) -> Result<ConnectorSpec> {
    let (connector, mut options) = connector_options(t);
    if connector == "kafka" {
        // Sink options of a table that is read do not apply (Flink validates them, then ignores them).
        options.retain(|k, _| !keel_spec::connectors::KAFKA_SINK_OPTIONS.contains(&k.as_str()));
    }
    let mut columns: Vec<ColumnDef> = t.columns.iter().filter_map(column_def).collect();
    if connector == "datagen" {
        // Keel's datagen emits one column, `id BIGINT`; the table must declare just that.
        let fits = matches!(columns.as_slice(), [c] if c.name == "id" && c.data_type == keel_formats::DataType::BigInt && c.metadata.is_none())
            && t.columns.len() == 1;
        if !fits {
            return Err(sql_error(format!(
                "table {} ({}): a datagen table has one column, `id BIGINT` (its sequence numbers)",
                t.name,
                at(t.span)
            )));
        }
        columns.clear();
    }
    Ok(ConnectorSpec {
        name: t.name.clone(),
        connector,
        from: None,
        options,
        columns,
        filter: None,
        select: Vec::new(),
    })
}

/// The rows a table gives its readers: its physical and metadata columns (computed ones are
/// inlined where used); a datagen table's `id BIGINT`.
fn input_schema(t: &TableDef) -> Result<keel_formats::Schema> {
    let columns: Vec<ColumnDef> = t.columns.iter().filter_map(column_def).collect();
    keel_formats::Schema::from_columns(&t.name, &columns)
        .map_err(|e| sql_error(format!("table {} ({}): {e}", t.name, at(t.span))))
}

/// Compiles an expression of the script against `input`; errors name `what` and the position
/// (the construct's, else `fallback`'s).
fn compile_at(
    expr: &ast::Expr,
    fallback: Span,
    input: &keel_formats::Schema,
    what: &dyn Fn() -> String,
) -> Result<keel_formats::CompiledExpr> {
    keel_formats::expr::compile(expr, input).map_err(|e| {
        let span = if e.span.start.line == 0 { fallback } else { e.span };
        sql_error(format!("{} ({}): {}", what(), at(span), e.reason))
    })
}

/// Whether a value of type `from` goes into a column of type `to` without loss, so that an
/// INSERT casts it implicitly (as Flink widens numbers): INT into BIGINT, DOUBLE or DECIMAL;
/// BIGINT into DOUBLE or DECIMAL; DECIMAL into DOUBLE or another DECIMAL.
fn widens(from: &keel_formats::DataType, to: &keel_formats::DataType) -> bool {
    use keel_formats::DataType as T;
    matches!(
        (from, to),
        (T::Int, T::BigInt | T::Double | T::Decimal { .. })
            | (T::BigInt, T::Double | T::Decimal { .. })
            | (T::Decimal { .. }, T::Double | T::Decimal { .. })
    )
}

/// A select item as the spec's text, of the target column's type: a `NULL` becomes
/// `CAST(NULL AS <type>)`, a narrower number is cast up; another type is left for the spec's
/// check of the sink's columns to refuse, naming the column.
fn typed_item(
    expr: ast::Expr,
    span: Span,
    input: &keel_formats::Schema,
    target: &keel_formats::DataType,
    what: &dyn Fn() -> String,
) -> Result<String> {
    if matches!(&expr, ast::Expr::Value(v) if v.value == ast::Value::Null) {
        return Ok(format!("CAST(NULL AS {target})"));
    }
    let compiled = compile_at(&expr, span, input, what)?;
    let from = compiled.data_type();
    if &from != target && widens(&from, target) {
        return Ok(format!("CAST({expr} AS {target})"));
    }
    Ok(expr.to_string())
}

/// A column an INSERT writes.
struct Target {
    name: String,
    def: ColumnDef,
}

/// The listed columns, else every physical and non-virtual metadata column of the sink table.
fn target_columns(t: &TableDef, insert: &InsertStmt) -> Result<Vec<Target>> {
    let writable = |c: &crate::parse::ColumnDecl| match &c.kind {
        ColumnKind::Physical { .. } => true,
        ColumnKind::Metadata { is_virtual, .. } => !is_virtual,
        ColumnKind::Computed(_) => false,
    };
    let mut out = Vec::new();
    if insert.columns.is_empty() {
        for c in t.columns.iter().filter(|c| writable(c)) {
            if let Some(def) = column_def(c) {
                out.push(Target { name: c.name.clone(), def });
            }
        }
    } else {
        for ident in &insert.columns {
            let c = t.columns.iter().find(|c| c.name == ident.value).ok_or_else(|| {
                sql_error(format!(
                    "INSERT INTO {}: unknown column {} ({}); columns: {}",
                    t.name,
                    ident.value,
                    at(ident.span),
                    t.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            if !writable(c) {
                return Err(sql_error(format!(
                    "INSERT INTO {}: column {} ({}) is computed or VIRTUAL and cannot be written",
                    t.name,
                    c.name,
                    at(ident.span)
                )));
            }
            if let Some(def) = column_def(c) {
                out.push(Target { name: c.name.clone(), def });
            }
        }
    }
    if out.is_empty() {
        return Err(sql_error(format!(
            "INSERT INTO {} ({}): the table has no column to write",
            t.name,
            at(insert.span)
        )));
    }
    Ok(out)
}

/// The SELECT of an INSERT, checked to be a single-table projection and filter.
struct Query<'a> {
    table: String,
    table_span: Span,
    /// Names that qualify a column of the FROM table: the table's name and its alias.
    qualifiers: Vec<String>,
    projection: &'a [ast::SelectItem],
    selection: Option<ast::Expr>,
}

fn refuse(what: &str, span: Span) -> KeelError {
    sql_error(format!("{what} ({}) is not supported", at(span)))
}

impl<'a> Query<'a> {
    fn of(insert: &'a InsertStmt, tokens: &[sqlparser::tokenizer::TokenWithSpan]) -> Result<Query<'a>> {
        let q = &*insert.query;
        let kw = |span: Span, word: &str| keyword_at(tokens, span, word);
        if let Some(with) = &q.with {
            return Err(refuse("WITH (a common table expression)", with.span()));
        }
        if let Some(o) = &q.order_by {
            return Err(refuse("ORDER BY", kw(o.span(), "ORDER")));
        }
        if let Some(l) = &q.limit_clause {
            return Err(refuse("LIMIT", kw(l.span(), "LIMIT")));
        }
        if q.fetch.is_some() {
            return Err(refuse("FETCH", q.span()));
        }
        let select = match &*q.body {
            ast::SetExpr::Select(s) => s,
            ast::SetExpr::SetOperation { op, left, .. } => {
                let op = op.to_string().to_uppercase();
                let after_left = Span::new(left.span().end, left.span().end);
                let at_op = tokens
                    .iter()
                    .find(|t| {
                        (t.span.start.line, t.span.start.column)
                            >= (after_left.start.line, after_left.start.column)
                            && t.token.to_string().eq_ignore_ascii_case(&op)
                    })
                    .map_or(q.body.span(), |t| t.span);
                return Err(refuse(&op, at_op));
            }
            ast::SetExpr::Values(v) => return Err(refuse("VALUES", kw(v.span(), "VALUES"))),
            ast::SetExpr::Query(inner) => return Err(refuse("a parenthesized query", inner.span())),
            other => return Err(refuse("this kind of query", other.span())),
        };
        let head = select.select_token.0.span;
        if select.distinct.is_some() {
            return Err(refuse("SELECT DISTINCT", head));
        }
        if select.top.is_some() || select.into.is_some() {
            return Err(refuse("TOP / INTO", head));
        }
        match &select.group_by {
            ast::GroupByExpr::All(_) => return Err(refuse("GROUP BY", head)),
            ast::GroupByExpr::Expressions(e, _) if !e.is_empty() => {
                return Err(refuse("GROUP BY", kw(e[0].span(), "GROUP")))
            }
            ast::GroupByExpr::Expressions(..) => {}
        }
        if let Some(h) = &select.having {
            return Err(refuse("HAVING", kw(h.span(), "HAVING")));
        }
        if let Some(w) = select.named_window.first() {
            return Err(refuse("WINDOW", w.span()));
        }
        if let Some(q) = &select.qualify {
            return Err(refuse("QUALIFY", q.span()));
        }
        if !select.lateral_views.is_empty() || !select.cluster_by.is_empty() || !select.sort_by.is_empty() {
            return Err(refuse("LATERAL VIEW / CLUSTER BY / SORT BY", head));
        }
        let from = match select.from.as_slice() {
            [one] => one,
            [] => return Err(sql_error(format!("SELECT ({}) needs FROM <table>", at(head)))),
            [_, second, ..] => return Err(refuse("a join (several tables in FROM)", second.span())),
        };
        if let Some(join) = from.joins.first() {
            return Err(refuse("JOIN", kw(join.span(), "JOIN")));
        }
        let (name, alias) = match &from.relation {
            ast::TableFactor::Table { name, alias, args: None, .. } => (name, alias),
            other => return Err(refuse("this FROM clause (only a table name)", other.span())),
        };
        let table = match name.0.as_slice() {
            [part] => part.as_ident().map(|i| i.value.clone()),
            _ => None,
        }
        .ok_or_else(|| {
            sql_error(format!(
                "FROM {name} ({}): a table of this script, by its single name",
                at(name.span())
            ))
        })?;
        let mut qualifiers = vec![table.clone()];
        if let Some(a) = alias {
            qualifiers.push(a.name.value.clone());
        }
        Ok(Query {
            table,
            table_span: name.span(),
            qualifiers,
            projection: &select.projection,
            selection: select.selection.clone(),
        })
    }

    /// Each output expression (computed columns inlined, qualifiers dropped) with its span.
    fn items(&self, table: &TableDef) -> Result<Vec<(ast::Expr, Span)>> {
        let mut out = Vec::new();
        for item in self.projection {
            match item {
                ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } => {
                    out.push((rewrite(e.clone(), table, &self.qualifiers)?, e.span()));
                }
                ast::SelectItem::Wildcard(_) => out.extend(self.star(table, item.span())?),
                ast::SelectItem::QualifiedWildcard(
                    ast::SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) if n.0.len() == 1
                    && n.0[0].as_ident().is_some_and(|i| self.qualifiers.contains(&i.value)) =>
                {
                    out.extend(self.star(table, item.span())?)
                }
                other => return Err(refuse(&format!("the select item {other}"), other.span())),
            }
        }
        Ok(out)
    }

    fn star(&self, table: &TableDef, span: Span) -> Result<Vec<(ast::Expr, Span)>> {
        table
            .columns
            .iter()
            .map(|c| {
                let ident = if quote(&c.name) == c.name {
                    ast::Ident::new(&c.name)
                } else {
                    ast::Ident::with_quote('`', &c.name)
                };
                let e = ast::Expr::Identifier(ident);
                Ok((rewrite(e, table, &self.qualifiers)?, span))
            })
            .collect()
    }
}

/// Drops the FROM table's qualifier from column references (`s.id` -> `id`), inlines computed
/// columns, and refuses aggregate and window functions and subqueries by name and position.
fn rewrite(expr: ast::Expr, table: &TableDef, qualifiers: &[String]) -> Result<ast::Expr> {
    rewrite_with(expr, table, qualifiers, true)
}

fn rewrite_with(
    mut expr: ast::Expr,
    table: &TableDef,
    qualifiers: &[String],
    inline: bool,
) -> Result<ast::Expr> {
    let flow = ast::visit_expressions_mut(&mut expr, |e| {
        match e {
            ast::Expr::CompoundIdentifier(parts)
                if parts.len() >= 2
                    && qualifiers.contains(&parts[0].value)
                    && table.columns.iter().any(|c| c.name == parts[1].value) =>
            {
                // `s.id` -> `id`; `s.properties.owner` -> `properties.owner` (a ROW's field).
                *e = if parts.len() == 2 {
                    ast::Expr::Identifier(parts[1].clone())
                } else {
                    ast::Expr::CompoundIdentifier(parts[1..].to_vec())
                };
            }
            ast::Expr::Function(f) => {
                if f.over.is_some() {
                    return ControlFlow::Break(refuse(&format!("the window function {}", f.name), f.span()));
                }
                let name = f.name.to_string().to_uppercase();
                const AGGREGATES: &[&str] = &[
                    "COUNT",
                    "SUM",
                    "AVG",
                    "MIN",
                    "MAX",
                    "COLLECT",
                    "LISTAGG",
                    "FIRST_VALUE",
                    "LAST_VALUE",
                    "STDDEV",
                    "STDDEV_POP",
                    "STDDEV_SAMP",
                    "VAR_POP",
                    "VAR_SAMP",
                    "VARIANCE",
                ];
                if AGGREGATES.contains(&name.as_str()) {
                    return ControlFlow::Break(refuse(&format!("the aggregate function {name}"), f.span()));
                }
            }
            ast::Expr::Subquery(q) | ast::Expr::Exists { subquery: q, .. } => {
                return ControlFlow::Break(refuse("a subquery", q.span()));
            }
            ast::Expr::In { target: ast::InTarget::Subquery(q), .. } => {
                return ControlFlow::Break(refuse("a subquery", q.span()));
            }
            _ => {}
        }
        if let (true, ast::Expr::Identifier(ident)) = (inline, &*e) {
            let computed = table.columns.iter().find_map(|c| match &c.kind {
                ColumnKind::Computed(x) if c.name == ident.value => Some(x),
                _ => None,
            });
            if let Some(x) = computed {
                // A computed column's expression reads the table's other columns, not computed ones.
                match rewrite_with((**x).clone(), table, qualifiers, false) {
                    Ok(inner) => *e = ast::Expr::Nested(Box::new(inner)),
                    Err(err) => return ControlFlow::Break(err),
                }
            }
        }
        ControlFlow::Continue(())
    });
    match flow {
        ControlFlow::Break(err) => Err(err),
        ControlFlow::Continue(()) => Ok(expr),
    }
}

/// A column name as the spec's expressions write it: bare when it is a plain name, else in
/// backquotes (a backquote doubled).
pub(crate) fn quote(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !is_keyword(name);
    if plain {
        name.to_string()
    } else {
        format!("`{}`", name.replace('`', "``"))
    }
}

/// Whether a word cannot stand as a bare column name or alias (`from`, `select`, `where`, ...).
fn is_keyword(word: &str) -> bool {
    use sqlparser::keywords::{
        ALL_KEYWORDS, ALL_KEYWORDS_INDEX, RESERVED_FOR_COLUMN_ALIAS, RESERVED_FOR_IDENTIFIER,
    };
    let upper = word.to_ascii_uppercase();
    ALL_KEYWORDS.binary_search(&upper.as_str()).is_ok_and(|i| {
        let k = ALL_KEYWORDS_INDEX[i];
        RESERVED_FOR_COLUMN_ALIAS.contains(&k) || RESERVED_FOR_IDENTIFIER.contains(&k)
    })
}

/// Puts the script's positions on an error of the compiled spec's validation: a field such as
/// `sources[0].scan.startup.mode` becomes the table, option and its line and column.
pub(crate) fn locate(err: KeelError, origins: &Origins, script: &Script) -> KeelError {
    let KeelError::InvalidSpec { field, reason } = err else {
        return err;
    };
    let table_of = |name: &str| script.tables.iter().find(|t| t.name == name);
    let option_or_column = |t: &TableDef, rest: &str| -> String {
        if let Some(o) = t.options.iter().find(|o| o.key == rest) {
            return format!("table {}, option '{}' ({})", t.name, o.key, at(o.span));
        }
        if let Some(idx) = rest
            .strip_prefix("columns[")
            .and_then(|r| r.split(']').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            if let Some(c) = t.columns.iter().filter(|c| !matches!(c.kind, ColumnKind::Computed(_))).nth(idx)
            {
                return format!("table {}, column {} ({})", t.name, c.name, at(c.span));
            }
        }
        format!("table {} ({}), {rest}", t.name, at(t.span))
    };
    let parse_index = |s: &str, prefix: &str| -> Option<(usize, String)> {
        let r = s.strip_prefix(prefix)?;
        let (i, rest) = r.split_once(']')?;
        Some((i.parse().ok()?, rest.strip_prefix('.').unwrap_or(rest).to_string()))
    };
    let place = if let Some((i, rest)) = parse_index(&field, "sources[") {
        origins.sources.get(i).and_then(|n| table_of(n)).map(|t| option_or_column(t, &rest))
    } else if let Some((i, rest)) = parse_index(&field, "sinks[") {
        origins.sinks.get(i).and_then(|(n, where_span, items)| {
            let t = table_of(n)?;
            if rest == "filter" {
                return where_span.map(|s| format!("the WHERE of INSERT INTO {} ({})", t.name, at(s)));
            }
            if let Some((j, _)) = parse_index(&rest, "select[") {
                return items
                    .get(j)
                    .map(|s| format!("INSERT INTO {}, select item {} ({})", t.name, j + 1, at(*s)));
            }
            Some(option_or_column(t, &rest))
        })
    } else {
        origins.sets.get(&field).map(|s| format!("SET '{}' ({})", &field["config.".len()..], at(*s)))
    };
    match place {
        Some(place) => sql_error(format!("{place}: {reason}")),
        None if field == "name" => sql_error(format!(
            "the job name: {reason} (it comes from SET 'pipeline.name', else the file name)"
        )),
        None => sql_error(format!("{field}: {reason}")),
    }
}
