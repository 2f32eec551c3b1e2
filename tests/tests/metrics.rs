//! Task metrics end to end: real Apache Kafka (the test binary's shared node from keel-testkit,
//! or the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names), real `keel` processes, the TaskManager's
//! Prometheus endpoint scraped over HTTP, and `keel status`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::bail;
use keel_testkit::{consume_all, create_topic, produce, unique_topic, Kafka, Produce};
use keel_tests::{metrics_address, scrape_metrics as scrape, wait_until, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(90);

/// One series of a scrape: name, labels, value.
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the series lines of a Prometheus text exposition (the label values Keel writes here
/// have no quotes or commas to escape).
fn parse(body: &str) -> Vec<Series> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some(Series { name: name.to_string(), labels, value })
        })
        .collect()
}

/// The series named `name` whose labels include `labels`.
fn matching<'a>(all: &'a [Series], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Series> {
    all.iter()
        .filter(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn sum(all: &[Series], name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(all, name, labels).iter().map(|s| s.value).sum()
}

/// A Kafka job with parallelism 2 copies 300 records from a topic of 3 partitions. Proves: the
/// TaskManager's `GET /metrics` counts exactly the records read and written, labelled with the
/// job, version, subtask, task and operator, with `currentOffset` per partition at the end of
/// what was produced; `keel status --output json` shows non-zero rates, the pending records
/// and the uneven spread of 3 partitions over 2 subtasks (naming 1 and 3 as even choices),
/// and the text status prints the throughput line and the warning; after the job is canceled,
/// its series are gone from the scrape.
#[test]
fn kafka_job_metrics_are_scraped_and_summed_in_status() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("metrics-in"), unique_topic("metrics-out"));
    create_topic(&bootstrap, &input, 3)?;
    create_topic(&bootstrap, &output, 1)?;
    const N: usize = 300;
    let written = produce(
        &bootstrap,
        &input,
        (0..N)
            .map(|n| Produce { partition: Some((n % 3) as i32), value: n.to_string(), ..Produce::default() })
            .collect(),
    )?;
    let mut ends: BTreeMap<String, i64> = BTreeMap::new();
    for r in &written {
        let end = ends.entry(r.partition.to_string()).or_insert(0);
        *end = (*end).max(r.offset + 1);
    }

    let mut sb = Sandbox::new("metrics-kafka", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let address = metrics_address(&mut sb, "tm-1")?;
    let spec = format!(
        r#"name: metered
parallelism: 2
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    scan.startup.mode: earliest-offset
sinks:
  - name: out
    connector: kafka
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
"#
    );
    sb.run_spec("metered", &spec, &[])?;
    let copied = consume_all(&bootstrap, &output, &unique_topic("reader"), N, LONG)?;
    assert_eq!(copied.len(), N);

    let job = [("job", "metered"), ("version", "1")];
    let source = [("job", "metered"), ("source", "in")];
    let sink = [("job", "metered"), ("sink", "out")];
    let series = wait_until("the scrape to count every record in and out", LONG, || {
        let all = parse(&scrape(&address)?);
        let (records_in, records_out) =
            (sum(&all, "keel_num_records_in_total", &source), sum(&all, "keel_num_records_out_total", &sink));
        if records_in == N as f64 && records_out == N as f64 {
            Ok(Some(all))
        } else {
            bail!("numRecordsIn {records_in}, numRecordsOut {records_out}")
        }
    })?;
    // One series per subtask, each with the task's labels.
    let per_subtask = matching(&series, "keel_num_records_in_total", &job);
    let subtasks: BTreeSet<&str> =
        per_subtask.iter().filter_map(|s| s.labels.get("subtask").map(String::as_str)).collect();
    assert_eq!(subtasks, BTreeSet::from(["0", "1"]));
    for s in &per_subtask {
        for label in ["job_id", "task_id", "source"] {
            assert!(s.labels.get(label).is_some_and(|v| !v.is_empty()), "{label} missing: {:?}", s.labels);
        }
    }
    assert!(sum(&series, "keel_num_bytes_in_total", &source) > 0.0);
    assert!(sum(&series, "keel_num_bytes_out_total", &sink) > 0.0);
    assert_eq!(sum(&series, "keel_num_records_in_errors_total", &source), 0.0);
    assert!(!matching(&series, "keel_num_records_in_per_second", &source).is_empty());
    assert!(!matching(&series, "keel_num_records_out_per_second", &sink).is_empty());
    assert!(!matching(&series, "keel_source_idle_time", &source).is_empty());
    assert!(!matching(&series, "keel_commits_succeeded_total", &source).is_empty());
    // Every partition's position is at the end of what was produced, once.
    let offsets = wait_until("currentOffset at the end of every partition", LONG, || {
        let all = parse(&scrape(&address)?);
        let offsets: BTreeMap<String, i64> = matching(&all, "keel_current_offset", &source)
            .iter()
            .filter(|s| s.labels.get("topic") == Some(&input))
            .filter_map(|s| Some((s.labels.get("partition")?.clone(), s.value as i64)))
            .collect();
        Ok((offsets == ends).then_some(offsets))
    })?;
    assert_eq!(offsets.len(), 3);

    let status = wait_until("status to show rates, pending records and the warning", LONG, || {
        let s = sb.status("metered")?;
        let t = &s["throughput"];
        let rated = t["records_in_per_second"].as_f64().is_some_and(|r| r > 0.0)
            && t["records_out_per_second"].as_f64().is_some_and(|r| r > 0.0)
            && t["pending_records"].is_i64()
            && s["tasks"].as_array().is_some_and(|ts| {
                ts.iter().all(|t| t["records_in_per_second"].as_f64().is_some_and(|r| r > 0.0))
            });
        Ok((rated && !s["warnings"].as_array().is_none_or(Vec::is_empty)).then_some(s))
    })?;
    let warnings = status["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = warnings[0].as_str().unwrap_or_default();
    assert!(warning.contains(&input) && warning.contains("3 partitions over parallelism 2"), "{warning}");
    assert!(warning.ends_with("parallelisms that spread 3 partitions evenly: 1, 3"), "{warning}");
    let assigned: u64 = status["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["source_partitions"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            assert_eq!(p["partitions"], 3, "{p}");
            p["assigned"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(assigned, 3, "each partition read by one subtask");
    assert_eq!(status["throughput"]["tasks_reporting"], 2);

    let text = sb.keel(&["status", "metered"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("throughput: ") && text.contains("records/s in"), "{text}");
    assert!(text.contains("warning: source in, topic ") && text.contains("IN/s"), "{text}");

    let cancel = sb.keel(&["cancel", "metered"])?;
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    wait_until("the job's series to leave the scrape", LONG, || {
        let body = scrape(&address)?;
        Ok((!body.contains("job=\"metered\"")).then_some(()))
    })?;
    Ok(())
}

/// A datagen job (no Kafka) still has its records counted and rated: the scrape shows
/// numRecordsIn and numRecordsOut growing, and `keel status` rates above zero; the TaskManager
/// serves the port it was given.
#[test]
fn datagen_job_is_counted_on_a_configured_port() -> anyhow::Result<()> {
    let port = keel_tests::free_port();
    let mut sb = Sandbox::new("metrics-datagen", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &[format!("metrics.reporter.prom.port={port}")])?;
    let address = metrics_address(&mut sb, "tm-1")?;
    assert_eq!(address, format!("127.0.0.1:{port}"));
    let out = sb.dir.join("out");
    let spec = keel_tests::datagen_to_file_spec("counted", 1, 500, None, &out);
    sb.run_spec("counted", &spec, &[])?;
    let labels = [("job", "counted"), ("subtask", "0")];
    let first = wait_until("records counted", LONG, || {
        let all = parse(&scrape(&address)?);
        let n = sum(&all, "keel_num_records_in_total", &labels);
        Ok((n > 0.0 && sum(&all, "keel_num_records_out_total", &labels) > 0.0).then_some(n))
    })?;
    wait_until("the count to grow", LONG, || {
        let all = parse(&scrape(&address)?);
        Ok((sum(&all, "keel_num_records_in_total", &labels) > first).then_some(()))
    })?;
    wait_until("status rates above zero", LONG, || {
        let s = sb.status("counted")?;
        let t = &s["throughput"];
        let ok = t["records_in_per_second"].as_f64().is_some_and(|r| r > 0.0)
            && t["records_out_per_second"].as_f64().is_some_and(|r| r > 0.0)
            && t["pending_records"].is_null()
            && s["warnings"].as_array().is_some_and(Vec::is_empty);
        Ok(ok.then_some(()))
    })?;
    Ok(())
}
