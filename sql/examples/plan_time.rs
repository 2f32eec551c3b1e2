//! The parse plus plan time of a 200-line SQL script (issue 16's closing figure):
//! `cargo run --release -p keel-sql --example plan_time`.
//!
//! The script: 10 Kafka source tables (JSON, eight columns each: physical, metadata and computed),
//! 10 Kafka sink tables, and a statement set of 10 INSERTs with CASE, CAST, string functions,
//! JSON_VALUE and a WHERE each. `keel_sql::compile` parses it, plans it into a job spec and
//! validates that spec the way the JobManager does (every option, format, filter and projection
//! compiled). Prints the script's size and the time of each of 200 compiles (min, median, p99).

use std::time::Instant;

fn script() -> String {
    let mut sql =
        String::from("SET 'pipeline.name' = 'plan-time';\nSET 'execution.checkpointing.interval' = '1 s';\n");
    for i in 0..10 {
        sql.push_str(&format!(
            "CREATE TEMPORARY TABLE src_{i} (
  id BIGINT,
  name STRING,
  amount DOUBLE,
  payload STRING,
  region STRING,
  score INT,
  ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp',
  day AS CAST(ts AS DATE)
) WITH (
  'connector' = 'kafka', 'topic' = 'in-{i}', 'properties.bootstrap.servers' = 'broker:9092',
  'properties.group.id' = 'g-{i}', 'scan.startup.mode' = 'earliest-offset', 'format' = 'json'
);
CREATE TEMPORARY TABLE dst_{i} (id BIGINT, label STRING, amount DOUBLE, day DATE) WITH (
  'connector' = 'kafka', 'topic' = 'out-{i}', 'properties.bootstrap.servers' = 'broker:9092',
  'format' = 'json');
"
        ));
    }
    sql.push_str("EXECUTE STATEMENT SET BEGIN\n");
    for i in 0..10 {
        sql.push_str(&format!(
            "INSERT INTO dst_{i}
SELECT id, CASE WHEN amount > 100 THEN UPPER(name) ELSE COALESCE(JSON_VALUE(payload, '$.label'), 'none') END,
       CAST(amount * 1.2 AS DOUBLE), day
FROM src_{i} WHERE id % 3 <> 0 AND name LIKE 'a%';
"
        ));
    }
    sql.push_str("END;\n");
    sql
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sql = script();
    let lines = sql.lines().count();
    let compiled = keel_sql::compile(&sql, "plan-time")?;
    println!(
        "script: {lines} lines, {} bytes; plan: {} sources, {} sinks",
        sql.len(),
        compiled.spec.sources.len(),
        compiled.spec.sinks.len()
    );
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        let c = keel_sql::compile(&sql, "plan-time")?;
        times.push(started.elapsed());
        std::hint::black_box(c);
    }
    times.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "parse + plan + validate, 200 runs: min {:.2} ms, median {:.2} ms, p99 {:.2} ms",
        ms(times[0]),
        ms(times[100]),
        ms(times[197])
    );
    Ok(())
}
