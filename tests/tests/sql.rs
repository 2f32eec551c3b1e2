//! Flink SQL jobs end to end: `keel run job.sql` and `keel upgrade JOB v2.sql` with real `keel`
//! processes and real Apache Kafka (the test binary's shared node from keel-testkit, or the
//! cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_testkit::{
    commit_offsets, consume_all, create_topic, produce, read_exactly, unique_topic, Kafka, Produce,
    TopicReader,
};
use keel_tests::{wait_until, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(120);

fn cluster(test: &str, slots: u32) -> anyhow::Result<Sandbox> {
    let mut sb = Sandbox::new(test, Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &[format!("taskmanager.numberOfTaskSlots={slots}")])?;
    Ok(sb)
}

/// Seed 002's Example 1 as its users write it; `<yourKafkaBrokers>` and
/// `<yourKafkaConsumerGroupId>` are the only things a test substitutes.
const EXAMPLE_1: &str = include_str!("../../sql/testdata/seed-002-example-1.sql");

/// Seed 002's Example 1, verbatim but for the brokers and the group id, run with `keel run
/// example-1.sql` on a cluster: CSV rows from topic `source` to topic `sink`. The example sets no
/// `scan.startup.mode`, so the source starts at the group's committed offsets (Flink's default,
/// `group-offsets`): the group is set up as one that read the topic up to offset 0. Proves: the
/// output equals the input, row for row (as a multiset: two partitions).
#[test]
fn seed_example_1_runs_verbatim_and_its_output_equals_its_input() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    create_topic(&bootstrap, "source", 2)?;
    create_topic(&bootstrap, "sink", 2)?;
    let input: Vec<String> = (0..500).map(|i| format!("{i},name-{i},{}", 18 + i % 50)).collect();
    produce(
        &bootstrap,
        "source",
        input.iter().map(|v| Produce { value: v.clone(), ..Produce::default() }).collect(),
    )?;
    let group = unique_topic("example-1-group");
    commit_offsets(&bootstrap, &group, "source", 0)?;

    let sb = cluster("sql-example-1", 1)?;
    let sql =
        EXAMPLE_1.replace("<yourKafkaBrokers>", &bootstrap).replace("<yourKafkaConsumerGroupId>", &group);
    sb.run_sql("example-1", &sql, &[])?;
    let status = sb.status("example-1")?;
    assert_eq!(status["job"]["state"], "running", "the job is named after the file: {status}");

    let mut output = read_exactly(&bootstrap, "sink", input.len(), LONG)?;
    let mut expected = input;
    output.sort();
    expected.sort();
    assert_eq!(output, expected);
    Ok(())
}

/// A script that is valid SQL but not something Keel runs (GROUP BY), and one with an
/// unknown connector option, are refused by `keel run` and `keel explain` with the construct or
/// option and its line and column. Proves: nothing is submitted (the cluster lists no job), and
/// `keel explain` of a good script prints its plan with no cluster at all.
#[test]
fn invalid_scripts_are_refused_before_submission() -> anyhow::Result<()> {
    let sb = cluster("sql-refusals", 1)?;
    let table = |name: &str, extra: &str| {
        format!(
            "CREATE TABLE {name} (id BIGINT, name STRING) WITH ('connector' = 'kafka', 'topic' = '{name}', \
             'properties.bootstrap.servers' = '127.0.0.1:1', 'format' = 'csv'{extra});\n"
        )
    };
    let grouped = format!(
        "{}{}INSERT INTO b\nSELECT MAX(id), name FROM a\nGROUP BY name;\n",
        table("a", ", 'scan.startup.mode' = 'earliest-offset'"),
        table("b", "")
    );
    let path = sb.write_file("grouped.sql", &grouped)?;
    let out = sb.keel(&["run", path.to_str().unwrap_or_default()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("GROUP BY (line 5, column 1) is not supported"), "{stderr}");

    let unknown = format!(
        "{}{}INSERT INTO b SELECT id, name FROM a;\n",
        table("a", ", 'scan.startup.mode' = 'earliest-offset', 'scan.startup.mood' = 'x'"),
        table("b", "")
    );
    let path = sb.write_file("unknown.sql", &unknown)?;
    for verb in ["run", "explain"] {
        let out = sb.keel(&[verb, path.to_str().unwrap_or_default()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb}: {stderr}");
        assert!(stderr.contains("table a, option 'scan.startup.mood' (line 1, column"), "{verb}: {stderr}");
    }
    let jobs = sb.keel_json(&["list"])?;
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "nothing was submitted: {jobs}");

    let good = format!(
        "{}{}INSERT INTO b SELECT id, name FROM a WHERE id > 3;\n",
        table("a", ", 'scan.startup.mode' = 'earliest-offset'"),
        table("b", "")
    );
    let path = sb.write_file("good.sql", &good)?;
    let out = std::process::Command::new(keel_tests::keel_bin())
        .args(["explain", path.to_str().unwrap_or_default()])
        .output()?;
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        plan.contains("sink b <- a: kafka, topic b, format csv") && plan.contains("filter: id > 3"),
        "{plan}"
    );
    Ok(())
}

/// Version `v` of a keyed, numbered pass-through as SQL (exactly-once sink); version 2 adds a
/// WHERE that keeps every record.
fn versioned_sql(bootstrap: &str, input: &str, output: &str, prefix: &str, version: u32) -> String {
    let filter = if version >= 2 { "\nWHERE n >= 0" } else { "" };
    format!(
        "SET 'pipeline.name' = 'sql-up';
SET 'execution.checkpointing.interval' = '{interval} ms';
CREATE TABLE numbers (k INT, n BIGINT) WITH (
  'connector' = 'kafka', 'topic' = '{input}', 'properties.bootstrap.servers' = '{bootstrap}',
  'properties.group.id' = 'sql-up', 'scan.startup.mode' = 'earliest-offset', 'format' = 'csv');
CREATE TABLE copy (k INT, n BIGINT) WITH (
  'connector' = 'kafka', 'topic' = '{output}', 'properties.bootstrap.servers' = '{bootstrap}',
  'format' = 'csv', 'key.fields' = 'k', 'key.format' = 'csv',
  'sink.delivery-guarantee' = 'exactly-once', 'sink.transactional-id-prefix' = '{prefix}');
INSERT INTO copy SELECT k, n FROM numbers{filter};
",
        interval = 400 + 100 * version,
    )
}

/// A keyed, numbered workload runs steadily while `keel upgrade` replaces the SQL job's version
/// 1 with version 2 (an added WHERE) by a handover. Source state carries over by table name.
/// Proves: a `read_committed` reader of the output sees every number exactly once (no loss, no
/// duplicate), and per key the order is kept.
#[test]
fn a_handover_from_one_sql_version_to_the_next_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("sql-up-in"), unique_topic("sql-up-out"));
    create_topic(&bootstrap, &input, 4)?;
    create_topic(&bootstrap, &output, 2)?;
    let prefix = unique_topic("sql-up-tx");
    let sb = cluster("sql-upgrade", 4)?;
    sb.run_sql("v1", &versioned_sql(&bootstrap, &input, &output, &prefix, 1), &[])?;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let producer = {
        let (bootstrap, input, stop, written) =
            (bootstrap.clone(), input.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut next = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let chunk = (next..next + 100)
                    .map(|n| Produce {
                        key: Some((n % 8).to_string()),
                        value: format!("{},{n}", n % 8),
                        ..Produce::default()
                    })
                    .collect();
                produce(&bootstrap, &input, chunk)?;
                next += 100;
                written.store(next, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };
    let reader = TopicReader::open(&bootstrap, &output, &unique_topic("check"))?;
    let mut records = Vec::new();
    wait_until("output before the upgrade", LONG, || {
        records.extend(reader.read_for(Duration::from_millis(200)));
        Ok((records.len() >= 500).then_some(()))
    })?;

    let v2 = sb.write_file("v2.sql", &versioned_sql(&bootstrap, &input, &output, &prefix, 2))?;
    let upgraded = sb.keel_json(&["upgrade", "sql-up", v2.to_str().unwrap_or_default()])?;
    let before = written.load(Ordering::SeqCst);
    wait_until("load after the upgrade", LONG, || {
        Ok((written.load(Ordering::SeqCst) >= before + 1000).then_some(()))
    })?;
    stop.store(true, Ordering::SeqCst);
    producer.join().map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let total = written.load(Ordering::SeqCst);
    wait_until("every record out", LONG, || {
        records.extend(reader.read_for(Duration::from_millis(200)));
        Ok((records.len() as u64 >= total).then_some(()))
    })?;
    // Anything beyond the input is a duplicate: give it a moment to show.
    records.extend(reader.read_for(Duration::from_secs(2)));

    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut last: BTreeMap<(i32, u64), u64> = BTreeMap::new();
    let mut out_of_order = 0;
    for r in &records {
        let text = r.value_str();
        let (k, n) = text.split_once(',').ok_or_else(|| anyhow::anyhow!("bad record {text:?}"))?;
        let (k, n): (u64, u64) = (k.parse()?, n.parse()?);
        *counts.entry(n).or_default() += 1;
        if last.insert((r.partition, k), n).is_some_and(|prev| prev > n) {
            out_of_order += 1;
        }
    }
    let lost = (0..total).filter(|n| !counts.contains_key(n)).count();
    let duplicated = counts.values().filter(|c| **c > 1).count();
    println!(
        "SQL v1 -> v2 handover under load: {total} records, {lost} lost, {duplicated} duplicated, \
         {out_of_order} out of order; upgrade: {upgraded}"
    );
    assert_eq!((lost, duplicated, out_of_order), (0, 0, 0));
    let status = sb.status("sql-up")?;
    assert_eq!(status["job"]["active_version"], 2, "{status}");
    Ok(())
}

/// Seed 002's Example 3 (key and value columns, with key and value prefixes and
/// `value.fields-include` = `EXCEPT_KEY`), with a Kafka sink table of the same layout in place
/// of the Hologres one (`INSERT INTO ... SELECT *` for its `CREATE TABLE AS`). Proves: every
/// record's key and value payloads come out as they went in (the prefixes stripped from the
/// payloads' field names, the key column only in the key).
#[test]
fn seed_example_3_key_and_value_columns_round_trip() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("ex3-in"), unique_topic("ex3-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    let records: Vec<Produce> = (0..200)
        .map(|i| Produce {
            key: Some(format!(r#"{{"id":{i}}}"#)),
            value: format!(r#"{{"name":"user {i}"}}"#),
            ..Produce::default()
        })
        .collect();
    produce(&bootstrap, &input, records)?;
    let table = |name: &str, topic: &str| {
        format!(
            "CREATE TEMPORARY TABLE {name} (
  `key_id` INT NOT NULL,
  `val_name` VARCHAR(200)
) WITH (
  'connector' = 'kafka',
  'properties.bootstrap.servers' = '{bootstrap}',
  'topic' = '{topic}',
  'scan.startup.mode' = 'earliest-offset',
  'key.format' = 'json',
  'value.format' = 'json',
  'key.fields' = 'key_id',
  'key.fields-prefix' = 'key_',
  'value.fields-prefix' = 'val_',
  'value.fields-include' = 'EXCEPT_KEY'
);
"
        )
    };
    let sql = format!(
        "{}{}INSERT INTO sync_kafka SELECT * FROM kafkaTable;\n",
        table("kafkaTable", &input),
        table("sync_kafka", &output)
    );
    let sb = cluster("sql-example-3", 1)?;
    sb.run_sql("example-3", &sql, &[])?;

    let out = consume_all(&bootstrap, &output, &unique_topic("reader"), 200, LONG)?;
    let mut got: Vec<(String, String)> = out
        .iter()
        .map(|r| (String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(), r.value_str()))
        .collect();
    let mut want: Vec<(String, String)> =
        (0..200).map(|i| (format!(r#"{{"id":{i}}}"#), format!(r#"{{"name":"user {i}"}}"#))).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    Ok(())
}

/// Seed 002's Example 4 table: a metadata column (`timestamp`) and a computed column
/// (`date AS CAST(timestamp AS DATE)`), with the Hologres `CREATE TABLE AS ... ADD COLUMN
/// order_id AS COALESCE(JSON_VALUE(properties, '$.order_id'), 'default')` written as a Kafka sink
/// table and `INSERT INTO ... SELECT *, <that expression>`. The seed's table names
/// `key.fields` = 'key_id', a column it does not have (Flink refuses that too): the test checks
/// that Keel refuses it by name, then runs the table without its three key options. Proves: each
/// output record carries the input's fields, the record timestamp as `timestamp`, its UTC date
/// as `date`, and the order id from the JSON text or 'default' when it has none.
#[test]
fn seed_example_4_metadata_computed_columns_and_json_value() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("ex4-in"), unique_topic("ex4-out"));
    create_topic(&bootstrap, &input, 1)?;
    create_topic(&bootstrap, &output, 1)?;
    // 2024-05-01 23:59:58 UTC, one second apart: the date changes after the second record.
    let base_ms: i64 = 1_714_607_998_000;
    let records: Vec<Produce> = (0..6i64)
        .map(|i| {
            let properties = match i % 3 {
                0 => format!(r#""{{\"order_id\": \"o-{i}\", \"owner\": \"x\"}}""#),
                1 => r#""{\"owner\": \"y\"}""#.to_string(),
                _ => "null".to_string(),
            };
            Produce {
                value: format!(r#"{{"distinct_id": {i}, "properties": {properties}}}"#),
                timestamp_ms: Some(base_ms + i * 1000),
                ..Produce::default()
            }
        })
        .collect();
    produce(&bootstrap, &input, records)?;
    let seed_table = format!(
        "CREATE TEMPORARY TABLE kafkaTable (
  `distinct_id` INT NOT NULL,
  `properties` STRING,
  `timestamp` TIMESTAMP_LTZ METADATA,
  `date` AS CAST(`timestamp` AS DATE)
) WITH (
  'connector' = 'kafka',
  'properties.bootstrap.servers' = '{bootstrap}',
  'topic' = '{input}',
  'scan.startup.mode' = 'earliest-offset',
  'key.format' = 'json',
  'value.format' = 'json',
  'key.fields' = 'key_id',
  'key.fields-prefix' = 'key_'
);
"
    );
    let sink = format!(
        "CREATE TEMPORARY TABLE sync_kafka (
  `distinct_id` INT,
  `properties` STRING,
  `timestamp` TIMESTAMP_LTZ(3),
  `date` DATE,
  `order_id` STRING
) WITH ('connector' = 'kafka', 'properties.bootstrap.servers' = '{bootstrap}', 'topic' = '{output}',
        'format' = 'json');
INSERT INTO sync_kafka
SELECT *, COALESCE(JSON_VALUE(`properties`, '$.order_id'), 'default') AS order_id FROM kafkaTable;
"
    );
    let sb = cluster("sql-example-4", 1)?;
    let seed_path = sb.write_file("seed-4.sql", &format!("{seed_table}{sink}"))?;
    let out = sb.keel(&["explain", seed_path.to_str().unwrap_or_default()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("key_id"), "the seed's key.fields: {stderr}");

    let table = seed_table
        .replace("  'key.format' = 'json',\n", "")
        .replace(",\n  'key.fields' = 'key_id',\n  'key.fields-prefix' = 'key_'", "");
    sb.run_sql("example-4", &format!("{table}{sink}"), &[])?;
    let out = consume_all(&bootstrap, &output, &unique_topic("reader"), 6, LONG)?;
    let mut rows = Vec::new();
    for r in &out {
        let v: serde_json::Value = serde_json::from_str(&r.value_str())?;
        rows.push((v["distinct_id"].as_i64().unwrap_or(-1), v));
    }
    rows.sort_by_key(|(id, _)| *id);
    let dates = ["2024-05-01", "2024-05-01", "2024-05-02", "2024-05-02", "2024-05-02", "2024-05-02"];
    for (i, (id, v)) in rows.iter().enumerate() {
        assert_eq!(*id, i as i64, "{v}");
        assert_eq!(v["date"], dates[i], "{v}");
        let want_order = if i % 3 == 0 { format!("o-{i}") } else { "default".to_string() };
        assert_eq!(v["order_id"], want_order.as_str(), "{v}");
        assert!(
            v["timestamp"].as_str().is_some_and(|t| t.starts_with(if i < 2 {
                "2024-05-01 23:59:5"
            } else {
                "2024-05-02 00:00:0"
            })),
            "{v}"
        );
        assert_eq!(v["properties"].is_null(), i % 3 == 2, "{v}");
    }
    Ok(())
}

/// Seed 002's Example 5 table verbatim (a `ROW<...>` column for nested JSON; topic and brokers
/// substituted), read with `properties.owner` in a statement set: one Kafka sink gets the fields
/// flat, another the whole ROW back as a nested object. Proves: each message's nested fields
/// come out by name (null where the object or the field is missing), and the ROW round-trips.
#[test]
fn seed_example_5_nested_json_is_read_by_field() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, flat, nested) =
        (unique_topic("ex5-in"), unique_topic("ex5-flat"), unique_topic("ex5-nested"));
    for t in [&input, &flat, &nested] {
        create_topic(&bootstrap, t, 1)?;
    }
    let messages = [
        r#"{"id": 101, "name": "VVP", "properties": {"owner": "Alibaba Cloud", "engine": "Flink"}}"#,
        r#"{"id": 102, "name": "Keel", "properties": {"owner": "us"}}"#,
        r#"{"id": 103, "name": "none", "properties": null}"#,
    ];
    produce(
        &bootstrap,
        &input,
        messages.iter().map(|m| Produce { value: m.to_string(), ..Produce::default() }).collect(),
    )?;
    let source = format!(
        "CREATE TEMPORARY TABLE kafka_source (
  id          VARCHAR,
  `name`      VARCHAR,
  properties  ROW<`owner` STRING, engine STRING>
) WITH (
  'connector' = 'kafka',
  'topic' = '{input}',
  'properties.bootstrap.servers' = '{bootstrap}',
  'scan.startup.mode' = 'earliest-offset',
  'format' = 'json'
);
"
    );
    let sinks = format!(
        "CREATE TEMPORARY TABLE flat (id STRING, name STRING, owner STRING, engine STRING) WITH (
  'connector' = 'kafka', 'topic' = '{flat}', 'properties.bootstrap.servers' = '{bootstrap}', 'format' = 'json');
CREATE TEMPORARY TABLE nested (id STRING, properties ROW<owner STRING, engine STRING>) WITH (
  'connector' = 'kafka', 'topic' = '{nested}', 'properties.bootstrap.servers' = '{bootstrap}', 'format' = 'json');
EXECUTE STATEMENT SET BEGIN
INSERT INTO flat SELECT id, `name`, properties.owner, properties.engine FROM kafka_source;
INSERT INTO nested SELECT id, properties FROM kafka_source;
END;
"
    );
    let sb = cluster("sql-example-5", 1)?;
    sb.run_sql("example-5", &format!("{source}{sinks}"), &[])?;

    let read = |topic: &str| -> anyhow::Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for r in consume_all(&bootstrap, topic, &unique_topic("reader"), 3, LONG)? {
            out.push(serde_json::from_str::<serde_json::Value>(&r.value_str())?);
        }
        out.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_string());
        Ok(out)
    };
    let flat_rows = read(&flat)?;
    let want = [
        ("101", "VVP", Some("Alibaba Cloud"), Some("Flink")),
        ("102", "Keel", Some("us"), None),
        ("103", "none", None, None),
    ];
    for (v, (id, name, owner, engine)) in flat_rows.iter().zip(want) {
        assert_eq!(v["id"], id, "the JSON number is read into the VARCHAR column as its text: {v}");
        assert_eq!(v["name"], name, "{v}");
        assert_eq!(v["owner"].as_str(), owner, "{v}");
        assert_eq!(v["engine"].as_str(), engine, "{v}");
    }
    let nested_rows = read(&nested)?;
    assert_eq!(
        nested_rows[0]["properties"],
        serde_json::json!({"owner": "Alibaba Cloud", "engine": "Flink"})
    );
    assert_eq!(nested_rows[1]["properties"]["owner"], "us");
    assert!(nested_rows[1]["properties"]["engine"].is_null(), "{}", nested_rows[1]);
    assert!(nested_rows[2]["properties"].is_null(), "{}", nested_rows[2]);
    Ok(())
}
