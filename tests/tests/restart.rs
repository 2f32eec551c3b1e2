//! Restart strategies and TaskManager failure detection, with real processes.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use keel_tests::{datagen_to_file_spec, wait_until, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(60);

fn max_attempt(status: &serde_json::Value) -> u64 {
    status["tasks"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["attempt"].as_u64()).max().unwrap_or(0))
        .unwrap_or(0)
}

/// A job whose file sink can never be opened: its `path` is a regular file, so creating the
/// output directory fails on every attempt, the same way each time.
fn failing_spec(sb: &Sandbox, name: &str, config: &str) -> anyhow::Result<String> {
    let blocker = sb.dir.join(format!("{name}-not-a-directory"));
    std::fs::write(&blocker, "a file where the sink wants a directory\n")?;
    Ok(format!(
        "name: {name}\nparallelism: 1\n{config}sources:\n  - name: numbers\n    connector: datagen\n    rows-per-second: 10\nsinks:\n  - name: out\n    connector: file\n    from: numbers\n    path: {}\n",
        blocker.display()
    ))
}

/// With the cluster's `restart-strategy.type: fixed-delay` and `attempts: 2`, a job that fails
/// deterministically is restarted twice and fails for good at its third attempt; `keel status`
/// shows the cause, the two restarts (attempt, cause, delay) and the failure, and the failure
/// is final (no fourth attempt by the time a later job's longer restart delay has passed). A
/// job that sets `restart-strategy.type: none` in its spec's `config:` fails at its first
/// failure.
#[test]
fn restart_strategy_limits_restarts_and_status_shows_the_history() -> anyhow::Result<()> {
    let mut sb = Sandbox::new(
        "restart-fixed",
        Ha::Local,
        &[
            ("restart-strategy.type", "fixed-delay"),
            ("restart-strategy.fixed-delay.attempts", "2"),
            ("restart-strategy.fixed-delay.delay", "300 ms"),
        ],
    )?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;

    // (a) fixed-delay, 2 attempts: 3 attempts in all, then failed.
    let spec = failing_spec(&sb, "doomed", "")?;
    sb.run_spec("doomed", &spec, &["--detached"])?;
    let status = sb.wait_job_state("doomed", "failed", LONG)?;
    assert_eq!(status["restarts"], 2, "{status}");
    assert_eq!(
        status["restart_strategy"],
        "fixed-delay (2 restart attempts, 300 ms delay); a lost taskmanager after 1 min without failures restarts at once"
    );
    let history = status["restart_history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 2, "{status}");
    for (i, entry) in history.iter().enumerate() {
        assert_eq!(entry["restart"], i as u64 + 1, "{entry}");
        assert_eq!(entry["attempt"], i as u64 + 1, "{entry}");
        assert_eq!(entry["delay_ms"], 300, "{entry}");
        let cause = entry["cause"].as_str().unwrap_or_default();
        assert!(cause.contains("file sink: cannot create directory"), "{entry}");
    }
    let failure = &status["failure"];
    assert_eq!(failure["attempt"], 3, "{status}");
    let cause = failure["cause"].as_str().unwrap_or_default();
    assert!(cause.contains("file sink: cannot create directory"), "{status}");
    assert!(failure["reason"].as_str().unwrap_or_default().contains("fixed-delay"), "{status}");
    let message = status["status_message"].as_str().unwrap_or_default();
    assert!(message.contains(cause) && message.contains("not restarted"), "{message}");
    assert_eq!(max_attempt(&status), 3);
    // Failed stays failed: no fourth attempt. A fourth attempt would be due 300 ms (the delay)
    // after the failure, on the JobManager's clock. A sentinel job submitted after the failure
    // was seen, failing with a restart delay of 1 s, is restarted on the same clock only later
    // than that: once it has failed for good (after its one restart), a fourth attempt of
    // `doomed` would have started and been logged already.
    let sentinel = failing_spec(
        &sb,
        "sentinel",
        "config:\n  restart-strategy.fixed-delay.attempts: 1\n  restart-strategy.fixed-delay.delay: 1 s\n",
    )?;
    sb.run_spec("sentinel", &sentinel, &["--detached"])?;
    let sentinel = sb.wait_job_state("sentinel", "failed", LONG)?;
    assert_eq!(sentinel["restarts"], 1, "{sentinel}");
    let later = sb.status("doomed")?;
    assert_eq!((later["job"]["state"].clone(), max_attempt(&later)), ("failed".into(), 3));
    let doomed_id = format!("job_id={} ", later["job"]["job_id"].as_str().unwrap_or_default());
    let attempts_failed = sb
        .proc("jm")
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("job attempt failed") && l.contains(&doomed_id))
        .count();
    assert_eq!(attempts_failed, 3, "three attempts of doomed in the jobmanager's log, no fourth");
    // The text output shows the same.
    let text = sb.keel(&["status", "doomed"])?;
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    for expected in
        ["restarts: 2", "restart strategy: fixed-delay", "not restarted:", "restarts (2)", "DELAY"]
    {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    println!("{text}");

    // (b) `none` from the spec's config: failed at the first failure.
    let spec = failing_spec(&sb, "fragile", "config:\n  restart-strategy.type: none\n")?;
    sb.run_spec("fragile", &spec, &["--detached"])?;
    let status = sb.wait_job_state("fragile", "failed", LONG)?;
    assert_eq!(status["restarts"], 0, "{status}");
    assert_eq!(status["restart_history"], serde_json::json!([]));
    assert_eq!(status["failure"]["attempt"], 1, "{status}");
    assert!(status["failure"]["reason"].as_str().unwrap_or_default().contains("none"), "{status}");
    assert!(status["restart_strategy"].as_str().unwrap_or_default().starts_with("none"), "{status}");
    assert_eq!(max_attempt(&status), 1);

    // A bad override is refused at submission, naming the key.
    let bad = failing_spec(&sb, "typo", "config:\n  restart-strategy.fixed-delay.attempts: many\n")?;
    let err = sb.run_spec("typo", &bad, &["--detached"]).expect_err("invalid attempts");
    assert!(err.to_string().contains("config.restart-strategy.fixed-delay.attempts"), "{err}");
    Ok(())
}

/// Kills the TaskManager running a job (kill -9) and waits until the job runs again on the
/// other TaskManager. Returns the time from the kill to the job running again, and the cause the
/// restart history gives.
fn taskmanager_kill_to_running(test: &str, settings: &[(&str, &str)]) -> anyhow::Result<(Duration, String)> {
    let mut sb = Sandbox::new(test, Ha::Local, settings)?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=1".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=1".into()])?;
    let out = sb.dir.join("out");
    sb.run_spec("job", &datagen_to_file_spec("survivor", 1, 100, None, &out), &[])?;
    let before = sb.status("survivor")?;
    let victim = before["tasks"][0]["taskmanager_id"].as_str().unwrap_or_default().to_string();
    let attempt = max_attempt(&before);
    let survivor = if victim == "tm-1" { "tm-2" } else { "tm-1" };

    let killed_at = Instant::now();
    sb.proc(&victim).proc.kill9();
    let status = wait_until("the job to run again on the other taskmanager", LONG, || {
        let s = sb.status("survivor")?;
        let running = s["job"]["state"] == "running" && max_attempt(&s) > attempt;
        if running {
            return Ok(Some(s));
        }
        Err(anyhow!("job is {} ({})", s["job"]["state"], s["status_message"]))
    })?;
    let elapsed = killed_at.elapsed();
    assert_eq!(status["tasks"][0]["taskmanager_id"], survivor, "{status}");
    assert_eq!(status["restarts"], 1, "{status}");
    let cause = status["restart_history"][0]["cause"].as_str().unwrap_or_default().to_string();
    assert!(cause.contains(&format!("taskmanager {victim} lost")), "{status}");
    // The job's first failure, a lost TaskManager: no pause (restart-strategy.taskmanager-loss).
    assert_eq!(status["restart_history"][0]["delay_ms"], 0, "{status}");
    // The ResourceManager's slot table lost it too.
    wait_until("the killed taskmanager to leave the slot table", LONG, || {
        let c = sb.cluster()?;
        let ids: Vec<String> = c["taskmanagers"]
            .as_array()
            .map(|a| a.iter().map(|t| t["id"].as_str().unwrap_or_default().to_string()).collect())
            .unwrap_or_default();
        Ok((!ids.contains(&victim)).then_some(()))
    })?;
    Ok((elapsed, cause))
}

/// Default settings: the ResourceManager's pings find the killed TaskManager after
/// `heartbeat.rpc-failure-threshold` (2) refused connections, well before `heartbeat.timeout`
/// (5 s), and the job restarts on the other TaskManager.
#[test]
fn killed_taskmanager_is_detected_by_refused_rpcs_and_the_job_moves() -> anyhow::Result<()> {
    let (elapsed, cause) = taskmanager_kill_to_running("restart-tm-kill", &[])?;
    println!(
        "taskmanager kill -9 to job running again (default settings): {} ms; cause: {cause}",
        elapsed.as_millis()
    );
    assert!(cause.contains("heartbeat.rpc-failure-threshold"), "detected by RPC failures: {cause}");
    Ok(())
}

/// With `heartbeat.rpc-failure-threshold: -1` the same loss is found by the heartbeat timeout.
#[test]
fn without_rpc_failure_detection_the_heartbeat_timeout_finds_the_loss() -> anyhow::Result<()> {
    let (elapsed, cause) =
        taskmanager_kill_to_running("restart-tm-kill-hb", &[("heartbeat.rpc-failure-threshold", "-1")])?;
    println!(
        "taskmanager kill -9 to job running again (heartbeat.rpc-failure-threshold -1): {} ms; cause: {cause}",
        elapsed.as_millis()
    );
    assert!(cause.contains("heartbeat.timeout"), "detected by the heartbeat timeout: {cause}");
    // The timeout counts from the last heartbeat, at most heartbeat.interval (1 s) before the
    // kill; the restart itself waits no pause (a lost TaskManager after a quiet period).
    assert!(elapsed >= Duration::from_secs(4), "not before heartbeat.timeout: {elapsed:?}");
    Ok(())
}

/// A killed TaskManager is found through its broken `WatchLiveness` stream, not by the next
/// ping round: with `heartbeat.interval` at 30 s the first regular ping comes 30 s after
/// registration, so a loss found well before that was found by the stream breaking. (Without
/// the stream this test fails: nothing else can find the loss before 30 s.)
#[test]
fn a_killed_taskmanager_is_found_by_its_broken_liveness_stream_before_any_ping_round() -> anyhow::Result<()> {
    let (elapsed, cause) = taskmanager_kill_to_running(
        "restart-tm-kill-watch",
        &[("heartbeat.interval", "30 s"), ("heartbeat.timeout", "120 s")],
    )?;
    println!(
        "taskmanager kill -9 to job running again (heartbeat.interval 30 s): {} ms; cause: {cause}",
        elapsed.as_millis()
    );
    assert!(cause.contains("heartbeat.rpc-failure-threshold"), "detected by RPC failures: {cause}");
    assert!(elapsed < Duration::from_secs(20), "found before the first ping round (30 s): {elapsed:?}");
    Ok(())
}

/// The TaskManager running the job (the first of the three with a free slot).
fn running_on(status: &serde_json::Value) -> String {
    status["tasks"][0]["taskmanager_id"].as_str().unwrap_or_default().to_string()
}

/// Waits until the job runs an attempt later than `attempt`; returns its status.
fn wait_running_after(sb: &Sandbox, job: &str, attempt: u64) -> anyhow::Result<serde_json::Value> {
    wait_until("the job to run again", LONG, || {
        let s = sb.status(job)?;
        if s["job"]["state"] == "running" && max_attempt(&s) > attempt {
            return Ok(Some(s));
        }
        Err(anyhow!("job is {} ({})", s["job"]["state"], s["status_message"]))
    })
}

/// The rule for lost TaskManagers, end to end with the default exponential-delay strategy: the
/// first TaskManager killed under a job that never failed restarts it with no pause (restart
/// history delay 0) and it runs again on another TaskManager; killing that one right after (well
/// within `restart-strategy.taskmanager-loss.quiet-period`, 1 min) restarts it only after the
/// grown backoff (at least initial-backoff, 1 s), and it runs again on the third.
#[test]
fn a_lost_taskmanager_restarts_the_job_at_once_but_a_second_loss_soon_after_waits() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("restart-tm-quiet", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    for tm in ["tm-1", "tm-2", "tm-3"] {
        sb.start("taskmanager", tm, &["taskmanager.numberOfTaskSlots=1".into()])?;
    }
    let out = sb.dir.join("out");
    sb.run_spec("job", &datagen_to_file_spec("twice", 1, 100, None, &out), &[])?;
    let first = sb.status("twice")?;
    let first_tm = running_on(&first);

    sb.proc(&first_tm).proc.kill9();
    let second = wait_running_after(&sb, "twice", max_attempt(&first))?;
    let second_tm = running_on(&second);
    assert_ne!(second_tm, first_tm, "{second}");
    let history = second["restart_history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 1, "{second}");
    assert_eq!(history[0]["delay_ms"], 0, "the first loss waits no backoff: {second}");
    let cause = history[0]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains(&format!("taskmanager {first_tm} lost")), "{second}");

    sb.proc(&second_tm).proc.kill9();
    let third = wait_running_after(&sb, "twice", max_attempt(&second))?;
    let third_tm = running_on(&third);
    assert!(third_tm != first_tm && third_tm != second_tm, "{third}");
    let history = third["restart_history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 2, "{third}");
    let cause = history[1]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains(&format!("taskmanager {second_tm} lost")), "{third}");
    let delay = history[1]["delay_ms"].as_u64().unwrap_or(0);
    assert!(delay >= 1000, "a second loss within the quiet period waits the backoff: {third}");
    println!("first loss: delay 0 ms; second loss soon after: delay {delay} ms");
    Ok(())
}

/// A TaskManager stopped with SIGTERM deregisters from the ResourceManager before it cancels its
/// tasks (whose reports also say why): the job counts that as a lost TaskManager, so its first
/// such failure restarts it with no pause (restart history delay 0, cause naming the shutdown),
/// and the restart's slot request does not pick the stopping TaskManager: the job runs again
/// on the other one at its next attempt (a slot on the stopping one would fail the deployment
/// and make a second restart).
#[test]
fn a_taskmanager_shut_down_restarts_the_job_at_once() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("restart-tm-sigterm", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    for tm in ["tm-1", "tm-2"] {
        sb.start("taskmanager", tm, &["taskmanager.numberOfTaskSlots=1".into()])?;
    }
    let out = sb.dir.join("out");
    sb.run_spec("job", &datagen_to_file_spec("stopped", 1, 100, None, &out), &[])?;
    let first = sb.status("stopped")?;
    let first_tm = running_on(&first);
    sb.proc(&first_tm).proc.signal("TERM")?;
    let second = wait_running_after(&sb, "stopped", max_attempt(&first))?;
    assert_ne!(running_on(&second), first_tm, "{second}");
    assert_eq!(max_attempt(&second), max_attempt(&first) + 1, "one restart, not two: {second}");
    let history = second["restart_history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 1, "{second}");
    let cause = history[0]["cause"].as_str().unwrap_or_default();
    // Either the ResourceManager's word (the TaskManager deregistered before canceling its
    // tasks) or the tasks' reports (canceled because it stops) arrives first; both say why.
    assert!(
        cause.contains(&format!(
            "taskmanager {first_tm} lost: deregistered: the taskmanager is shutting down"
        )) || cause.contains("canceled: its taskmanager is shutting down"),
        "{second}"
    );
    assert_eq!(history[0]["delay_ms"], 0, "{second}");
    Ok(())
}

/// Bytes in every file of a file sink's output directory.
fn bytes_in(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Not a check, a measurement (`cargo test -p keel-tests --test restart -- --ignored
/// --nocapture measure`; `KEEL_BIN` picks the binary): kills the TaskManager running a
/// datagen -> file job (100 rows/s) three times, each in a cluster of its own with three
/// one-slot TaskManagers, and prints the time from kill -9 to the output growing again and to
/// `keel status` showing the job running again, and their medians.
#[test]
#[ignore]
fn measure_taskmanager_kill_to_output() -> anyhow::Result<()> {
    let mut to_output = Vec::new();
    let mut to_running = Vec::new();
    for round in 0..3 {
        let mut sb = Sandbox::new("restart-tm-measure", Ha::Local, &[])?;
        sb.start("resourcemanager", "rm", &[])?;
        sb.start("jobmanager", "jm", &[])?;
        for tm in ["tm-1", "tm-2", "tm-3"] {
            sb.start("taskmanager", tm, &["taskmanager.numberOfTaskSlots=1".into()])?;
        }
        let out = sb.dir.join("out");
        sb.run_spec("job", &datagen_to_file_spec("measured", 1, 100, None, &out), &[])?;
        let before = sb.status("measured")?;
        wait_until("output", LONG, || Ok((bytes_in(&out) > 0).then_some(())))?;
        let victim = running_on(&before);
        let killed_at = Instant::now();
        sb.proc(&victim).proc.kill9();
        let at_kill = bytes_in(&out);
        let output = std::thread::scope(|scope| {
            // Not wait_until: it pauses 100 ms between looks, too coarse for this figure.
            let watcher = scope.spawn(|| {
                while killed_at.elapsed() < LONG {
                    if bytes_in(&out) > at_kill {
                        return Ok(killed_at.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(anyhow!("the output did not grow within {LONG:?} of the kill"))
            });
            let running =
                wait_running_after(&sb, "measured", max_attempt(&before)).map(|s| (killed_at.elapsed(), s));
            (watcher.join(), running)
        });
        let (Ok(grew), running) = output else {
            return Err(anyhow!("the output watcher panicked"));
        };
        let grew = grew?;
        let (running, status) = running?;
        println!(
            "round {round}: kill -9 {victim} (at {:?} since the epoch): output grows again after {} ms, \
             job running again after {} ms (keel status polled); restart history: {}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
                - killed_at.elapsed(),
            grew.as_millis(),
            running.as_millis(),
            status["restart_history"]
        );
        if std::env::var_os("KEEL_TEST_KEEP").is_some() {
            println!("logs in {}", sb.dir.display());
        }
        to_output.push(grew);
        to_running.push(running);
    }
    to_output.sort();
    to_running.sort();
    println!(
        "median of 3: kill -9 -> output grows again {} ms; -> job running again {} ms",
        to_output[1].as_millis(),
        to_running[1].as_millis()
    );
    Ok(())
}

/// Not a check, a measurement (`cargo test -p keel-tests --test restart -- --ignored
/// --nocapture measure_kafka`; `KEEL_BIN` picks the binary): a Kafka -> Kafka pass-through
/// (one partition, 1 s checkpoints, at-least-once) fed without pause (a few hundred records/s
/// on the 2-core machine), in three clusters of
/// three one-slot TaskManagers each; kills the TaskManager running it and prints the time from
/// kill -9 to the next record the broker appended to the sink topic (its LogAppendTime, 20 ms
/// or more after the kill, so that requests the killed process sent just before do not count)
/// and the median of 3.
#[test]
#[ignore]
fn measure_kafka_taskmanager_kill_to_output() -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::ClientConfig;
    use std::sync::atomic::{AtomicBool, Ordering};

    let broker = keel_testkit::Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let mut gaps = Vec::new();
    for round in 0..3 {
        let (source, sink) =
            (keel_testkit::unique_topic("tmkill-in"), keel_testkit::unique_topic("tmkill-out"));
        keel_testkit::create_topic(&bootstrap, &source, 1)?;
        // The broker's append time on each output record says when it was written, whatever
        // the reader's lag.
        keel_testkit::create_topic_with(
            &bootstrap,
            &sink,
            1,
            &[("message.timestamp.type", "LogAppendTime")],
        )?;
        let stop = AtomicBool::new(false);
        let result = std::thread::scope(|scope| -> anyhow::Result<Duration> {
            let feeder = scope.spawn(|| -> anyhow::Result<u64> {
                let producer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("linger.ms", "0")
                    .create()?;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let value = n.to_string();
                    if producer.send(BaseRecord::<(), str>::to(&source).payload(value.as_str())).is_ok() {
                        n += 1;
                    }
                    producer.poll(Duration::from_millis(1));
                }
                producer.flush(Duration::from_secs(10))?;
                Ok(n)
            });
            let measured = (|| -> anyhow::Result<Duration> {
                let mut sb = Sandbox::new("restart-tm-measure-kafka", Ha::Local, &[])?;
                sb.start("resourcemanager", "rm", &[])?;
                sb.start("jobmanager", "jm", &[])?;
                for tm in ["tm-1", "tm-2", "tm-3"] {
                    sb.start("taskmanager", tm, &["taskmanager.numberOfTaskSlots=1".into()])?;
                }
                let spec = format!(
                    "name: pass\nparallelism: 1\nconfig:\n  execution.checkpointing.interval: 1 s\nsources:\n  - {{name: in, connector: kafka, topic: {source}, properties.bootstrap.servers: '{bootstrap}', properties.group.id: pass-{round}, scan.startup.mode: earliest-offset}}\nsinks:\n  - {{name: out, connector: kafka, from: in, topic: {sink}, properties.bootstrap.servers: '{bootstrap}'}}\n"
                );
                sb.run_spec("pass", &spec, &[])?;
                let reader: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("group.id", keel_testkit::unique_topic("tmkill-reader"))
                    .set("fetch.wait.max.ms", "5")
                    .create()?;
                let mut assignment = rdkafka::TopicPartitionList::new();
                assignment.add_partition_offset(&sink, 0, rdkafka::Offset::Beginning)?;
                reader.assign(&assignment)?;
                // Output flows, and a checkpoint completed (so the restart replays little).
                wait_until("output and a checkpoint", LONG, || {
                    let _ = reader.poll(Duration::from_millis(10));
                    let s = sb.status("pass")?;
                    Ok((s["checkpoints"].as_array().is_some_and(|c| !c.is_empty())
                        || s["latest_checkpoint"].is_object())
                    .then_some(()))
                })?;
                std::thread::sleep(Duration::from_millis(1500));
                let before = sb.status("pass")?;
                let victim = running_on(&before);
                let epoch_ms = || {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0)
                };
                let killed_ms = epoch_ms();
                sb.proc(&victim).proc.kill9();
                let mut last_before = None;
                let again_ms = wait_until("output again", LONG, || {
                    use rdkafka::Message;
                    // Everything the reader has (wait_until pauses between calls).
                    while let Some(m) = reader.poll(Duration::from_millis(5)) {
                        match m?.timestamp().to_millis() {
                            Some(t) if t >= killed_ms + 20 => return Ok(Some(t - killed_ms)),
                            Some(t) => last_before = Some(t - killed_ms),
                            None => {}
                        }
                    }
                    Ok(None)
                })?;
                let again = Duration::from_millis(again_ms as u64);
                println!("round {round}: last output before: {last_before:?} ms from the kill");
                let after = wait_running_after(&sb, "pass", max_attempt(&before))?;
                println!(
                    "round {round}: kill -9 {victim} -> output in {sink} again after {} ms; restart history: {}",
                    again.as_millis(),
                    after["restart_history"]
                );
                if std::env::var_os("KEEL_TEST_KEEP").is_some() {
                    println!("logs in {}", sb.dir.display());
                }
                Ok(again)
            })();
            stop.store(true, Ordering::SeqCst);
            let fed = feeder.join().map_err(|_| anyhow!("the feeder panicked"))??;
            println!("round {round}: {fed} records fed");
            measured
        });
        gaps.push(result?);
    }
    gaps.sort();
    println!("median of 3: kill -9 -> Kafka output again {} ms", gaps[1].as_millis());
    Ok(())
}
