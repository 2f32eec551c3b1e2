//! Process-level checks of issue 12's exactly-once hardening that the connector tests
//! (connectors/kafka/tests/eos.rs) cannot make: real `keel` processes.

use std::time::Duration;

use keel_testkit::free_port;
use keel_tests::{wait_until, Ha, Sandbox};

/// How long a stopped process may take to exit before the test calls it stuck: far above a
/// normal stop (a second or two), far below the 10 minutes the blocked Kafka call below lasts.
const EXIT_BOUND: Duration = Duration::from_secs(90);

/// A TaskManager exits when stopped, also right after a Kafka task against an unreachable
/// broker was canceled while opening. The source's open blocks in librdkafka for
/// `properties.default.api.timeout.ms` (10 minutes here); the cancel returns at once, and that
/// call must not keep the stopped process alive (it did: the tokio runtime's shutdown waited
/// for the `spawn_blocking` thread, and `keel dev` had to kill the TaskManager). The test
/// asserts that the process exits, with success, after SIGTERM.
#[test]
fn a_taskmanager_exits_after_a_kafka_task_against_an_unreachable_broker_was_canceled() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("tm-exit", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=1".into()])?;
    let unreachable = format!("127.0.0.1:{}", free_port());
    let out = sb.dir.join("out");
    let spec = format!(
        r#"name: unreachable
parallelism: 1
sources:
  - name: in
    connector: kafka
    topic: nowhere
    properties.bootstrap.servers: {unreachable}
    properties.default.api.timeout.ms: 600000
    scan.startup.mode: earliest-offset
    format: raw
sinks:
  - name: out
    connector: file
    path: {}
"#,
        out.display()
    );
    sb.run_spec("unreachable", &spec, &["--detached"])?;
    // Deployed: the task opens its sinks (a file: at once) and its source, whose metadata
    // request blocks in librdkafka (it failed only after the full 10 minutes in a run without
    // the cancel).
    wait_until("the task to be deployed", Duration::from_secs(60), || {
        Ok(sb.proc("tm-1").proc.log_text().contains("task deployed").then_some(()))
    })?;
    wait_until("the job to report its task deploying", Duration::from_secs(60), || {
        let status = sb.status("unreachable")?;
        Ok(status.to_string().to_lowercase().contains("deploying").then_some(()))
    })?;
    let cancel = sb.keel(&["cancel", "unreachable"])?;
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    sb.wait_job_state("unreachable", "canceled", Duration::from_secs(60))?;

    let tm = &mut sb.proc("tm-1").proc;
    tm.signal("TERM")?;
    let status = wait_until("the stopped taskmanager to exit", EXIT_BOUND, || Ok(tm.child.try_wait()?))?;
    let log = tm.log_text();
    assert!(log.contains("taskmanager stopped"), "{log}");
    assert!(status.success(), "exit status {status}; log:\n{log}");
    Ok(())
}

fn exactly_once_spec(name: &str, bootstrap: &str, topic: &str, prefix: &str, extra: &str) -> String {
    format!(
        r#"name: {name}
parallelism: 1
config:
  execution.checkpointing.interval: 1 s
sources:
  - name: numbers
    connector: datagen
    rows-per-second: 10
sinks:
  - name: out
    connector: kafka
    from: numbers
    topic: {topic}
    properties.bootstrap.servers: {bootstrap}
    sink.delivery-guarantee: exactly-once
    sink.transactional-id-prefix: {prefix}
    format: json
{extra}"#
    )
}

/// `keel run` of a job whose exactly-once sink asks for `transaction.timeout.ms` above the
/// broker's `transaction.max.timeout.ms` (Flink's default of 1 hour against Kafka's 15
/// minutes) is refused at submission, naming the field and the broker's maximum, and no job
/// is created; so is one not above the checkpoint interval plus the failover budget. The same
/// sink with the default (15 minutes) is accepted and runs.
#[test]
fn submission_checks_the_transaction_timeout_against_the_broker() -> anyhow::Result<()> {
    let kafka = keel_testkit::Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let topic = keel_testkit::unique_topic("txn-timeout");
    keel_testkit::create_topic(bootstrap, &topic, 1)?;
    let mut sb = Sandbox::new("txn-timeout", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=1".into()])?;

    let field = "sinks[0].properties.transaction.timeout.ms";
    let hour = exactly_once_spec(
        "hour",
        bootstrap,
        &topic,
        "hour",
        "    properties.transaction.timeout.ms: 3600000\n",
    );
    let err = sb.run_spec("hour", &hour, &[]).expect_err("refused").to_string();
    assert!(err.contains(field), "{err}");
    assert!(err.contains("transaction.max.timeout.ms (900000 ms)"), "{err}");
    let short = exactly_once_spec(
        "short",
        bootstrap,
        &topic,
        "short",
        "    properties.transaction.timeout.ms: 2000\n",
    );
    let err = sb.run_spec("short", &short, &[]).expect_err("refused").to_string();
    assert!(err.contains(field) && err.contains("failover budget"), "{err}");
    let list = sb.keel(&["list"])?;
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(!listed.contains("hour") && !listed.contains("short"), "no job was created: {listed}");

    let fine = exactly_once_spec("fine", bootstrap, &topic, "fine", "");
    sb.run_spec("fine", &fine, &[])?;
    sb.wait_job_state("fine", "running", Duration::from_secs(60))?;
    Ok(())
}

/// The transactional-id prefix clash check covers upgrades: a side-by-side version (which runs
/// as a job of its own) whose sink uses the prefix of another running job is refused when the
/// upgrade is requested, naming the field and that job, before any savepoint is taken; one
/// that reuses the running version's own prefix is refused too. A handover upgrade to another
/// job's prefix is refused the same way, and the job keeps running its version.
#[test]
fn upgrades_are_refused_a_transactional_id_prefix_another_job_uses() -> anyhow::Result<()> {
    let kafka = keel_testkit::Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let topics: Vec<String> = (0..3).map(|i| keel_testkit::unique_topic(&format!("clash-{i}"))).collect();
    for t in &topics {
        keel_testkit::create_topic(bootstrap, t, 1)?;
    }
    let mut sb = Sandbox::new("prefix-clash", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.run_spec("a", &exactly_once_spec("a", bootstrap, &topics[0], "prefix-a", ""), &[])?;
    sb.run_spec("b", &exactly_once_spec("b", bootstrap, &topics[1], "prefix-b", ""), &[])?;
    sb.wait_job_state("b", "running", Duration::from_secs(60))?;

    let field = "sinks[0].sink.transactional-id-prefix";
    let upgrade = |file: &str, mode: &str| -> anyhow::Result<String> {
        let out = sb.keel(&["upgrade", "b", file, "--mode", mode])?;
        Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let to_a = sb.write_spec("b-to-a", &exactly_once_spec("b", bootstrap, &topics[2], "prefix-a", ""))?;
    let to_a = to_a.to_str().unwrap_or_default().to_string();
    let text = upgrade(&to_a, "side-by-side")?;
    assert!(text.contains(field) && text.contains("\"a\""), "side by side onto job a's prefix: {text}");
    assert!(!text.contains("savepoint"), "refused before any savepoint: {text}");
    let own = sb.write_spec("b-own", &exactly_once_spec("b", bootstrap, &topics[2], "prefix-b", ""))?;
    let text = upgrade(own.to_str().unwrap_or_default(), "side-by-side")?;
    assert!(text.contains(field) && text.contains("own transactional-id prefix"), "{text}");
    let text = upgrade(&to_a, "handover")?;
    assert!(text.contains(field) && text.contains("\"a\""), "handover onto job a's prefix: {text}");

    let status = sb.status("b")?;
    assert_eq!(status["job"]["state"], "running", "{status}");
    let list = sb.keel(&["list"])?;
    assert!(!String::from_utf8_lossy(&list.stdout).contains("b.v"), "no side-by-side job was started");
    Ok(())
}

/// `(last stable offset, high watermark)` of every partition of `topic`.
fn stable_and_high(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<(i64, i64)>> {
    (0..partitions)
        .map(|p| {
            let lso = keel_testkit::last_stable_offset(bootstrap, topic, p)?;
            let (_, high) = keel_testkit::watermarks(bootstrap, topic, p)?;
            Ok((lso, high))
        })
        .collect()
}

/// A canceled job and a version retired by an upgrade leave no transaction open: an
/// exactly-once Kafka-to-Kafka job at parallelism 2 writes to a two-partition topic while
/// records keep coming, is rescaled to 1 (a
/// handover: subtask 1's transactional id is used by no later version, so nothing would ever
/// fence a transaction it left open) and is then canceled. Right after, every partition's
/// last stable offset reaches its high watermark within 30 s (an abandoned transaction would
/// hold it for transaction.timeout.ms, 15 minutes), and a read_committed reader sees every
/// record the job committed.
#[test]
fn a_canceled_job_and_a_retired_version_leave_no_open_transaction() -> anyhow::Result<()> {
    let kafka = keel_testkit::Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let (input, topic) = (keel_testkit::unique_topic("lso-in"), keel_testkit::unique_topic("lso"));
    keel_testkit::create_topic(bootstrap, &input, 2)?;
    keel_testkit::create_topic(bootstrap, &topic, 2)?;
    let produce = |range: std::ops::Range<u64>| {
        keel_testkit::produce(
            bootstrap,
            &input,
            range
                .map(|n| keel_testkit::Produce { value: format!("{},{n}", n % 7), ..Default::default() })
                .collect(),
        )
    };
    produce(0..300)?;
    let mut sb = Sandbox::new("lso", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    let spec = format!(
        r#"name: lso
parallelism: 2
maxParallelism: 4
config:
  execution.checkpointing.interval: 500 ms
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: lso
    scan.startup.mode: earliest-offset
    format: csv
    columns:
      - {{name: k, type: INT}}
      - {{name: n, type: BIGINT}}
sinks:
  - name: out
    connector: kafka
    topic: {topic}
    properties.bootstrap.servers: {bootstrap}
    format: csv
    key.fields: k
    key.format: csv
    sink.delivery-guarantee: exactly-once
    sink.transactional-id-prefix: {prefix}
"#,
        prefix = keel_testkit::unique_topic("lso-tx")
    );
    sb.run_spec("lso", &spec, &[])?;
    let reader =
        keel_testkit::TopicReader::open(bootstrap, &topic, &keel_testkit::unique_topic("lso-reader"))?;
    let mut seen = Vec::new();
    let mut read_until = |n: usize| {
        wait_until(&format!("{n} committed records"), Duration::from_secs(60), || {
            while let Some(r) = reader.poll(Duration::from_millis(200)) {
                seen.push(r);
            }
            if seen.len() >= n {
                return Ok(Some(seen.len()));
            }
            let ends = stable_and_high(bootstrap, &topic, 2)?;
            Err(anyhow::anyhow!("{} read; (LSO, high) per partition {ends:?}", seen.len()))
        })
    };
    read_until(300)?;
    produce(300..600)?;
    let rescale = sb.keel_json(&["rescale", "lso", "--parallelism", "1"])?;
    assert_eq!(rescale["error"], "", "{rescale}");
    produce(600..900)?;
    let after_rescale = read_until(900)?;
    produce(900..1000)?;
    let cancel = sb.keel(&["cancel", "lso"])?;
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    sb.wait_job_state("lso", "canceled", Duration::from_secs(60))?;

    let ends = wait_until(
        "every partition's last stable offset at its high watermark",
        Duration::from_secs(30),
        || {
            let now = stable_and_high(bootstrap, &topic, 2)?;
            if now.iter().all(|(lso, high)| lso == high) {
                Ok(Some(now))
            } else {
                Err(anyhow::anyhow!("(LSO, high) per partition: {now:?}"))
            }
        },
    )?;
    assert!(ends.iter().all(|(_, high)| *high > 0), "both partitions were written: {ends:?}");
    // Nothing is held back: the reader gets the rest of what was committed, no record twice.
    seen.extend(reader.read_until_quiet(Duration::from_secs(3)));
    let mut values: Vec<String> = seen.iter().map(keel_testkit::TestRecord::value_str).collect();
    let total = values.len();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), total, "a record committed twice");
    println!(
        "committed records read: {after_rescale} before the cancel, {total} in all; (LSO, high) {ends:?}"
    );
    Ok(())
}
