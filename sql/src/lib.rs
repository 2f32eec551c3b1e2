//! Flink SQL job scripts: `keel run job.sql`.
//!
//! A script is what a Flink user writes for a Kafka pipeline:
//!
//! ```sql
//! SET 'execution.checkpointing.interval' = '1s';
//! CREATE TEMPORARY TABLE kafka_source (id INT, name STRING, age INT) WITH (
//!   'connector' = 'kafka', 'topic' = 'source', 'properties.bootstrap.servers' = 'b:9092',
//!   'properties.group.id' = 'g', 'format' = 'csv');
//! CREATE TEMPORARY TABLE kafka_sink (id INT, name STRING, age INT) WITH (
//!   'connector' = 'kafka', 'topic' = 'sink', 'properties.bootstrap.servers' = 'b:9092', 'format' = 'csv');
//! INSERT INTO kafka_sink SELECT id, name, age FROM kafka_source;
//! ```
//!
//! [`compile`] turns it into the same [`JobSpec`] a YAML spec gives (see `plan` for how tables
//! and statements map onto sources and sinks), validated with every check a YAML spec gets, with
//! errors that name the table, option, column or construct and its line and column.

mod parse;
mod plan;

use keel_proto::Result;
use keel_spec::JobSpec;

/// Whether a spec file is SQL (by its extension, `.sql`), else YAML.
pub fn is_sql_file(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("sql"))
}

/// A compiled script: the checked spec and its YAML text (what the cluster is sent).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub spec: JobSpec,
    pub yaml: String,
}

/// Compiles a SQL script into a checked job spec. `default_name` names the job when the script
/// does not `SET 'pipeline.name'` (the CLI passes the file's stem). Errors are
/// `KeelError::InvalidSpec` with field `sql` and a reason with the line and column.
pub fn compile(sql: &str, default_name: &str) -> Result<Compiled> {
    let script = parse::parse_script(sql)?;
    let planned = plan::plan(&script, default_name)?;
    let yaml = planned.spec.to_yaml();
    let spec = JobSpec::parse(&yaml).map_err(|e| plan::locate(e, &planned.origins, &script))?;
    Ok(Compiled { spec, yaml })
}

#[cfg(test)]
mod tests;
