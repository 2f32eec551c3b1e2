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
