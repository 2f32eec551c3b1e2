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
/// shows the cause, the two restarts (attempt, cause, delay) and the failure. A job that sets
/// `restart-strategy.type: none` in its spec's `config:` fails at its first failure.
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
    assert_eq!(status["restart_strategy"], "fixed-delay (2 restart attempts, 300 ms delay)");
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
    // Failed stays failed: no fourth attempt.
    std::thread::sleep(Duration::from_secs(1));
    let later = sb.status("doomed")?;
    assert_eq!((later["job"]["state"].clone(), max_attempt(&later)), ("failed".into(), 3));
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
    assert!(elapsed >= Duration::from_secs(5), "not before heartbeat.timeout: {elapsed:?}");
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
