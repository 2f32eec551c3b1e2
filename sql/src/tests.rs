//! Script -> spec: what maps where, and every refusal with its message and position.

use keel_proto::{KeelError, Result};
use keel_spec::JobSpec;

use crate::compile;

/// Seed 002's Example 1, verbatim but for the brokers and the group id.
fn example_1() -> String {
    include_str!("../testdata/seed-002-example-1.sql")
        .replace("<yourKafkaBrokers>", "127.0.0.1:9092")
        .replace("<yourKafkaConsumerGroupId>", "example-1")
}

fn refused(sql: &str) -> Result<String> {
    match compile(sql, "job") {
        Ok(c) => Err(KeelError::internal(format!("expected a refusal, got {}", c.yaml))),
        Err(e @ KeelError::InvalidSpec { .. }) => Ok(e.to_string()),
        Err(other) => Err(KeelError::internal(format!("expected InvalidSpec, got {other}"))),
    }
}

fn assert_refused(sql: &str, expected: &str) -> Result<()> {
    let message = refused(sql)?;
    if !message.contains(expected) {
        return Err(KeelError::internal(format!("expected {expected:?} in {message:?}")));
    }
    Ok(())
}

const SOURCE: &str = "CREATE TABLE src (id BIGINT, name STRING, age INT, `part` INT METADATA FROM 'partition' VIRTUAL, \
                      ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp', d AS age + 1) \
                      WITH ('connector' = 'kafka', 'topic' = 'in', 'properties.bootstrap.servers' = 'b:9092', \
                      'properties.group.id' = 'g', 'scan.startup.mode' = 'earliest-offset', 'format' = 'json');\n";
const SINK: &str = "CREATE TABLE dst (id BIGINT, name STRING) WITH ('connector' = 'kafka', 'topic' = 'out', \
                    'properties.bootstrap.servers' = 'b:9092', 'format' = 'json');\n";

/// Example 1 compiles to one Kafka source and one Kafka sink with the tables' names, columns and
/// options, the SELECT list named after the sink's columns, and the job named after the file.
#[test]
fn example_1_maps_tables_onto_a_source_and_a_sink() -> Result<()> {
    let c = compile(&example_1(), "example-1")?;
    let spec = &c.spec;
    assert_eq!(spec.name, "example-1");
    assert_eq!(spec.parallelism, 1);
    assert_eq!(spec.sources.len(), 1);
    assert_eq!(spec.sinks.len(), 1);
    let (src, sink) = (&spec.sources[0], &spec.sinks[0]);
    assert_eq!((src.name.as_str(), src.connector.as_str()), ("kafka_source", "kafka"));
    assert_eq!(src.options.get("topic").map(String::as_str), Some("source"));
    assert_eq!(src.options.get("format").map(String::as_str), Some("csv"));
    assert_eq!(src.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["id", "name", "age"]);
    assert_eq!(sink.from.as_deref(), Some("kafka_source"));
    assert_eq!(sink.select, ["id AS id", "name AS name", "age AS age"]);
    assert_eq!(sink.filter, None);
    // The YAML the cluster receives parses back into the same spec.
    assert_eq!(&JobSpec::parse(&c.yaml)?, spec);
    Ok(())
}

/// A YAML spec and its SQL twin give the same plan: the same source schema and format, and a
/// sink with the same filter, projection, schema and format.
#[test]
fn a_yaml_spec_and_its_sql_twin_give_the_same_plan() -> Result<()> {
    let sql = format!("{SOURCE}{SINK}INSERT INTO dst SELECT id, name FROM src WHERE age >= 18;");
    let from_sql = compile(&sql, "twins")?.spec;
    let yaml = "name: twins
sources:
  - name: src
    connector: kafka
    topic: in
    properties.bootstrap.servers: b:9092
    properties.group.id: g
    scan.startup.mode: earliest-offset
    format: json
    columns:
      - {name: id, type: BIGINT}
      - {name: name, type: STRING}
      - {name: age, type: INT}
      - {name: part, type: INT, metadata: partition}
      - {name: ts, type: TIMESTAMP, metadata: timestamp}
sinks:
  - name: dst
    connector: kafka
    from: src
    topic: out
    properties.bootstrap.servers: b:9092
    format: json
    filter: age >= 18
    select: [id, name]
";
    let from_yaml = JobSpec::parse(yaml)?;
    let (a, b) = (from_sql.source_plan(0)?, from_yaml.source_plan(0)?);
    assert_eq!(a.schema, b.schema);
    assert_eq!(format!("{:?}", a.format), format!("{:?}", b.format));
    assert_eq!(format!("{:?}", a.kafka), format!("{:?}", b.kafka));
    let (a, b) = (from_sql.sink_plan(0)?, from_yaml.sink_plan(0)?);
    assert_eq!(a.schema, b.schema);
    assert_eq!(a.filter, b.filter);
    assert_eq!(a.projection, b.projection);
    assert_eq!(format!("{:?}", a.format), format!("{:?}", b.format));
    assert_eq!(format!("{:?}", a.kafka), format!("{:?}", b.kafka));
    Ok(())
}

/// SET names the job and sets the parallelism and the job configuration; a statement set
/// gives one sink per INSERT, a second write to the same table gets a numbered name, and a
/// table read twice is one source.
#[test]
fn sets_and_statement_sets() -> Result<()> {
    let sql = format!(
        "SET 'pipeline.name' = 'fan-out';\nSET 'parallelism.default' = '2';\n\
         SET 'execution.checkpointing.interval' = '2 s';\n{SOURCE}{SINK}\
         EXECUTE STATEMENT SET BEGIN\n\
         INSERT INTO dst SELECT id, name FROM src WHERE age < 18;\n\
         INSERT INTO dst SELECT s.id, UPPER(s.name) FROM src AS s WHERE s.age >= 18;\n\
         END;"
    );
    let spec = compile(&sql, "ignored")?.spec;
    assert_eq!(spec.name, "fan-out");
    assert_eq!(spec.parallelism, 2);
    assert_eq!(spec.config.get("execution.checkpointing.interval").map(String::as_str), Some("2 s"));
    assert_eq!(spec.sources.len(), 1);
    assert_eq!(spec.sinks.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["dst", "dst_2"]);
    assert_eq!(spec.sinks[1].select, ["id AS id", "UPPER(name) AS name"], "the alias qualifier is dropped");
    assert_eq!(spec.sinks[1].filter.as_deref(), Some("age >= 18"));
    Ok(())
}

/// `SELECT *` is every column of the FROM table, computed ones inlined; an INSERT's column list
/// picks the targets.
#[test]
fn star_computed_columns_and_column_lists() -> Result<()> {
    let sink = "CREATE TABLE wide (id BIGINT, name STRING, age INT, `part` INT, ts TIMESTAMP(3), d INT) \
                WITH ('connector' = 'kafka', 'topic' = 'w', 'properties.bootstrap.servers' = 'b:9092', 'format' = 'json');\n";
    let sql = format!("{SOURCE}{sink}INSERT INTO wide SELECT * FROM src;");
    let spec = compile(&sql, "star")?.spec;
    assert_eq!(
        spec.sinks[0].select,
        ["id AS id", "name AS name", "age AS age", "part AS part", "ts AS ts", "(age + 1) AS d"]
    );
    let sql = format!("{SOURCE}{SINK}INSERT INTO dst (name, id) SELECT name, id FROM src;");
    let spec = compile(&sql, "list")?.spec;
    assert_eq!(spec.sinks[0].select, ["name AS name", "id AS id"]);
    Ok(())
}

/// Valid SQL that Keel does not run is refused by name and position.
#[test]
fn unsupported_constructs_are_refused_with_their_position() -> Result<()> {
    let head = format!("{SOURCE}{SINK}");
    let line = head.lines().count() + 1;
    let cases = [
        (
            "INSERT INTO dst SELECT id, name FROM src\nGROUP BY id, name;",
            format!("GROUP BY (line {}, column 1)", line + 1),
        ),
        (
            "INSERT INTO dst SELECT a.id, b.name FROM src a JOIN src b ON a.id = b.id;",
            "JOIN (line".to_string(),
        ),
        (
            "INSERT INTO dst SELECT id, name FROM src UNION ALL SELECT id, name FROM src;",
            format!("UNION (line {line}, column 42)"),
        ),
        (
            "INSERT INTO dst SELECT DISTINCT id, name FROM src;",
            format!("SELECT DISTINCT (line {line}, column 17)"),
        ),
        (
            "INSERT INTO dst SELECT id, name FROM src ORDER BY id;",
            format!("ORDER BY (line {line}, column 42)"),
        ),
        ("INSERT INTO dst SELECT id, name FROM src LIMIT 3;", format!("LIMIT (line {line}, column 42)")),
        (
            "INSERT INTO dst SELECT COUNT(*), name FROM src;",
            format!("the aggregate function COUNT (line {line}, column 24)"),
        ),
        (
            "INSERT INTO dst SELECT id, LAG(name) OVER (ORDER BY id) FROM src;",
            "the window function LAG".to_string(),
        ),
        (
            "INSERT INTO dst SELECT id, name FROM src WHERE id IN (SELECT id FROM src);",
            "a subquery (line".to_string(),
        ),
        (
            "INSERT INTO dst SELECT id, name FROM nowhere;",
            format!("unknown table nowhere (line {line}, column 38)"),
        ),
        (
            "INSERT INTO dst SELECT id FROM src;",
            "the SELECT gives 1 column(s) but the target has 2 (id, name)".to_string(),
        ),
        ("INSERT INTO dst (id, nope) SELECT id, name FROM src;", "unknown column nope".to_string()),
        ("CREATE VIEW v AS SELECT 1;", "CREATE VIEW".to_string()),
        ("INSERT INTO dst VALUES (1, 'a');", format!("VALUES (line {line}, column 17) is not supported")),
        ("SELECT * FROM src;", format!("SELECT (line {line}, column 1) is not supported")),
        ("DELETE FROM src;", format!("DELETE (line {line}, column 1) is not supported")),
    ];
    for (stmt, expected) in cases {
        assert_refused(&format!("{head}{stmt}"), &expected)?;
    }
    Ok(())
}

/// Table declarations: a primary key, a duplicate or reserved option, a missing connector, an
/// unknown type or metadata key, and no INSERT are refused, naming the table and position.
#[test]
fn bad_tables_are_refused_with_their_position() -> Result<()> {
    let tail = "INSERT INTO dst SELECT id, name FROM src;";
    let cases = [
        (
            "CREATE TABLE src (id BIGINT, name STRING, PRIMARY KEY (id) NOT ENFORCED) WITH ('connector' = 'kafka');",
            "PRIMARY KEY (line 1, column 43) in table src is not supported",
        ),
        (
            "CREATE TABLE src (id BIGINT, name STRING) WITH ('connector' = 'kafka', 'topic' = 'a', 'topic' = 'b');",
            "table src, option 'topic' (line 1, column 87) is set twice (first at line 1, column 72)",
        ),
        ("CREATE TABLE src (id BIGINT, name STRING) WITH ('topic' = 'a');", "table src (line 1, column 1) needs 'connector'"),
        ("CREATE TABLE src (id BIGINT, name STRING) WITH ('connector' = 'kafka', 'filter' = 'x');", "option 'filter'"),
        ("CREATE TABLE src (id BIGINT, name STRANGE) WITH ('connector' = 'kafka');", "table src, column name (line 1, column 35): unknown type"),
        (
            "CREATE TABLE src (id BIGINT, name STRING, o BIGINT METADATA FROM 'ofset') WITH ('connector' = 'kafka');",
            "unknown metadata key 'ofset' (line 1, column 66)",
        ),
        ("CREATE TABLE src (id BIGINT) WITH ('connector' = 'kafka') LIKE other;", "LIKE"),
        ("CREATE TABLE src (id BIGINT)\n  PARTITIONED BY (id) WITH ('connector' = 'kafka');", "PARTITIONED BY (line 2, column 3) is not supported"),
        ("CREATE TABLE cat.src (id BIGINT) WITH ('connector' = 'kafka');", "table name cat.src (line 1, column 14) must be a single name"),
        ("CREATE TABLE src (id BIGINT, c ARRAY<INT>) WITH ('connector' = 'kafka');", "type ARRAY<INT> (line 1, column 32) is not supported yet"),
        ("CREATE TABLE src (id BIGINT, c ROW<a INT, a INT>) WITH ('connector' = 'kafka');", "table src, column c (line 1, column 32)"),
    ];
    for (table, expected) in cases {
        assert_refused(&format!("{table}\n{SINK}{tail}"), expected)?;
    }
    assert_refused(SOURCE, "the script has no INSERT INTO")?;
    Ok(())
}

/// An error of the spec's own validation (an unknown option, a bad value, an unknown column in a
/// filter) is reported at the table option, column or statement it came from.
#[test]
fn spec_errors_point_back_into_the_script() -> Result<()> {
    let bad_option =
        SOURCE.replace("'scan.startup.mode' = 'earliest-offset'", "'scan.startup.mode' = 'sometime'");
    let message = refused(&format!("{bad_option}{SINK}INSERT INTO dst SELECT id, name FROM src;"))?;
    assert!(message.contains("table src, option 'scan.startup.mode' (line 1, column"), "{message}");
    let message =
        refused(&format!("{SOURCE}{SINK}INSERT INTO dst SELECT id, name FROM src WHERE agee > 3;"))?;
    assert!(message.contains("the WHERE of INSERT INTO dst (line 3, column"), "{message}");
    let message = refused(&format!("SET 'execution.checkpointing.interval' = 'soon';\n{SOURCE}{SINK}INSERT INTO dst SELECT id, name FROM src;"))?;
    assert!(message.contains("SET 'execution.checkpointing.interval' (line 1, column 1)"), "{message}");
    Ok(())
}

/// Syntax errors keep sqlparser's line and column.
#[test]
fn syntax_errors_name_line_and_column() -> Result<()> {
    assert_refused(
        "CREATE TABLE t (id BIGINT,, x INT) WITH ('connector' = 'kafka');",
        "Line: 1, Column: 27",
    )?;
    Ok(())
}

/// A sink table's writable metadata column (`timestamp`) stays metadata in the sink's plan, so
/// the record timestamp is written rather than a payload field; VIRTUAL metadata columns of a
/// sink are not written at all; a SELECT whose types differ from the sink's columns is refused
/// naming the column.
#[test]
fn sink_metadata_columns_are_written_as_metadata() -> Result<()> {
    let sink = "CREATE TABLE stamped (id BIGINT, ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp', \
                t STRING METADATA FROM 'topic' VIRTUAL) WITH ('connector' = 'kafka', 'topic' = 'o', \
                'properties.bootstrap.servers' = 'b:9092', 'format' = 'json');\n";
    let spec = compile(&format!("{SOURCE}{sink}INSERT INTO stamped SELECT id, ts FROM src;"), "stamps")?.spec;
    let plan = spec.sink_plan(0)?;
    let columns = plan.schema.columns();
    assert_eq!(columns.len(), 2, "the VIRTUAL column is not written: {columns:?}");
    assert_eq!(columns[1].metadata, Some(keel_formats::MetadataKey::Timestamp));
    assert_refused(
        &format!("{SOURCE}{sink}INSERT INTO stamped SELECT name, ts FROM src;"),
        "table stamped, column id (line 2, column 23): the sink's rows are (id STRING, ts TIMESTAMP)",
    )?;
    Ok(())
}

/// The SELECT list is typed against the source: a narrower number is cast up to its target
/// column (INT into BIGINT), a NULL takes the column's type, a WHERE that is not a condition and
/// an expression of the wrong types are refused with the position of the construct.
#[test]
fn select_items_are_typed_against_the_target_columns() -> Result<()> {
    let spec = compile(&format!("{SOURCE}{SINK}INSERT INTO dst SELECT age, NULL FROM src;"), "typed")?.spec;
    assert_eq!(spec.sinks[0].select, ["CAST(age AS BIGINT) AS id", "CAST(NULL AS STRING) AS name"]);
    let plan = spec.sink_plan(0)?;
    assert_eq!(plan.schema.columns()[0].data_type, keel_formats::DataType::BigInt);
    assert_refused(
        &format!("{SOURCE}{SINK}INSERT INTO dst SELECT id, name FROM src WHERE age + 1;"),
        "the WHERE of INSERT INTO dst (line 3, column 48) must be a condition (BOOLEAN), not INT",
    )?;
    assert_refused(
        &format!("{SOURCE}{SINK}INSERT INTO dst SELECT id, name FROM src WHERE name > 3;"),
        "the WHERE of INSERT INTO dst (line 3, column 48): cannot compare STRING with INT",
    )?;
    assert_refused(
        &format!("{SOURCE}{SINK}INSERT INTO dst SELECT id, UPPER(age) FROM src;"),
        "INSERT INTO dst, select item 2 for column name (line 3, column 34): UPPER needs a STRING argument, found INT",
    )?;
    Ok(())
}

/// The README's SQL job (`deploy/adults.sql`) compiles: the example users copy stays valid.
#[test]
fn the_readme_sql_job_compiles() -> Result<()> {
    let spec = compile(include_str!("../../deploy/adults.sql"), "adults")?.spec;
    assert_eq!((spec.name.as_str(), spec.parallelism), ("adults", 2));
    assert_eq!(
        spec.sinks[0].select,
        [
            "CAST(id AS BIGINT) AS id",
            "UPPER(TRIM(name)) AS name",
            "age AS age",
            "CAST(ts AS DATE) AS since",
            "ts AS ts"
        ]
    );
    Ok(())
}

/// ROW columns (both spellings, nested) read by field in the SELECT list and WHERE, qualified
/// or not: seed 002's Example 5 table.
#[test]
fn row_columns_are_read_by_field() -> Result<()> {
    let source = "CREATE TEMPORARY TABLE kafka_source (
  id          VARCHAR,
  `name`      VARCHAR,
  properties  ROW<`owner` STRING, engine STRING>,
  extra       ROW(a INT, b ROW<c STRING>)
) WITH (
  'connector' = 'kafka',
  'topic' = 'xxx',
  'properties.bootstrap.servers' = 'xxx',
  'scan.startup.mode' = 'earliest-offset',
  'format' = 'json'
);
";
    let sink = "CREATE TABLE owners (id STRING, owner STRING, c STRING, p ROW<owner STRING, engine STRING>) \
                WITH ('connector' = 'kafka', 'topic' = 'o', 'properties.bootstrap.servers' = 'b:1', 'format' = 'json');\n";
    let sql = format!(
        "{source}{sink}INSERT INTO owners SELECT s.id, s.properties.owner, extra.b.c, properties FROM kafka_source s \
         WHERE properties.engine = 'Flink';"
    );
    let spec = compile(&sql, "ex5")?.spec;
    assert_eq!(
        spec.sinks[0].select,
        ["id AS id", "properties.owner AS owner", "extra.b.c AS c", "properties AS p"]
    );
    assert_eq!(spec.sinks[0].filter.as_deref(), Some("properties.engine = 'Flink'"));
    assert_eq!(spec.sources[0].columns[3].data_type.to_string(), "ROW<a INT, b ROW<c STRING>>");
    assert_refused(
        &format!(
            "{source}{sink}INSERT INTO owners SELECT id, properties.ownr, id, properties FROM kafka_source;"
        ),
        "the ROW has no field `ownr`; its fields: owner, engine",
    )?;
    Ok(())
}
