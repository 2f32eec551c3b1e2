//! A leader paused past its lease (SIGSTOP) and resumed (SIGCONT), on a real etcd, in a real
//! child process.
//!
//! The test re-runs this very test binary as the child: with `KEEL_HA_PAUSE_ENDPOINTS` set,
//! `pause_child_leader` campaigns on etcd and then "acts" every 10 ms on a thread of its own:
//! before each action it calls `Leadership::check()` and prints `ACT <n> <lease clock ns>`; the first refused check
//! prints `REFUSED <lease clock ns> <reason>`, then the child tries a fenced write with the same
//! leadership and prints how it ended, and waits to be killed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{etcd_ha, EtcdCluster};
use keel_ha::{HaServices, LeaseInstant, Role};
use keel_proto::KeelError;
use tokio_util::sync::CancellationToken;

const JM: Role = Role::JobManager;
const MARK: &str = "KEEL-HA-PAUSE";
const TTL: Duration = Duration::from_secs(2);

fn ns(t: LeaseInstant) -> u128 {
    t.as_duration().as_nanos()
}

/// Not a test of its own: the body of the child process (see the module docs). Without
/// `KEEL_HA_PAUSE_ENDPOINTS` it does nothing.
#[test]
fn pause_child_leader() {
    let Ok(endpoints) = std::env::var("KEEL_HA_PAUSE_ENDPOINTS") else {
        return;
    };
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let ha = etcd_ha(&endpoints, "pause", TTL).await;
        let never = CancellationToken::new();
        let l = ha.campaign(JM, "child:1", &never).await.expect("campaign");
        println!("{MARK} LEADER {}", l.epoch);
        // The actions run on a thread of their own, as a leader's RPC handlers do on their
        // worker threads: after SIGCONT it runs at once, typically before the runtime's timers
        // have woken the keep-alive task.
        let actor = std::thread::spawn({
            let l = l.clone();
            move || {
                let mut n = 0u64;
                loop {
                    let at = LeaseInstant::now();
                    match l.check() {
                        Ok(()) => {
                            n += 1;
                            println!("{MARK} ACT {n} {}", ns(at));
                        }
                        Err(e) => {
                            println!("{MARK} REFUSED {} {e}", ns(at));
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        tokio::task::spawn_blocking(move || actor.join()).await.expect("join").expect("actor");
        match ha.put(&l, "owner", b"child".to_vec()).await {
            Ok(()) => println!("{MARK} PUT accepted"),
            Err(KeelError::LeadershipLost { .. }) => println!("{MARK} PUT refused LeadershipLost"),
            Err(e) => println!("{MARK} PUT failed {e}"),
        }
        std::future::pending::<()>().await;
    });
}

struct ChildLeader {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildLeader {
    fn spawn(endpoints: &[String]) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new(exe)
            .args(["pause_child_leader", "--exact", "--nocapture", "--test-threads=1"])
            .env("KEEL_HA_PAUSE_ENDPOINTS", endpoints.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child process");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(at) = line.find(MARK) {
                    if tx.send(line[at + MARK.len()..].trim().to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        ChildLeader { child, lines }
    }

    fn next_line(&mut self, limit: Duration) -> String {
        match self.lines.recv_timeout(limit) {
            Ok(line) => line,
            Err(e) => {
                let status = self.child.try_wait().ok().flatten();
                panic!("child reported nothing within {limit:?} ({e}); exit status {status:?}")
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The child's scheduler state from /proc (`T` when stopped).
    fn proc_state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // The state follows the command name in parentheses, which may hold spaces.
        stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())
    }
}

impl Drop for ChildLeader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A leader stopped with SIGSTOP past its lease, while a standby takes over, and then resumed
/// with SIGCONT, does not act again: every action it took was checked before it was stopped,
/// its first check after the resume is refused (the lease deadline is compared with the clock
/// by `check()` itself, whether or not its keep-alive task has run since), and a fenced write
/// with the old leadership is refused with `LeadershipLost`. The standby's epoch is higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_stopped_past_its_lease_refuses_its_first_action_after_resume() {
    let etcd = EtcdCluster::single().await;
    let endpoints = etcd.endpoints();
    let mut child = ChildLeader::spawn(&endpoints);
    let line = child.next_line(Duration::from_secs(30));
    let old_epoch: u64 = line
        .strip_prefix("LEADER ")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("unexpected child line {line:?}"));

    let standby = Arc::new(etcd_ha(&endpoints, "pause", TTL).await);
    let never = CancellationToken::new();
    let campaign = tokio::spawn({
        let standby = standby.clone();
        let never = never.clone();
        async move { standby.campaign(JM, "standby:1", &never).await }
    });

    // The child acts while it leads.
    for _ in 0..20 {
        let line = child.next_line(Duration::from_secs(10));
        assert!(line.starts_with("ACT "), "the child must act while it leads: {line:?}");
    }
    child.signal("STOP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.proc_state() != Some('T') {
        assert!(std::time::Instant::now() < deadline, "the child did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stopped_at = LeaseInstant::now();

    let new = tokio::time::timeout(Duration::from_secs(30), campaign)
        .await
        .expect("the standby wins within 30 s")
        .expect("join")
        .expect("campaign");
    let takeover = stopped_at.elapsed();
    assert!(new.epoch > old_epoch, "epochs grow: {old_epoch} -> {}", new.epoch);

    // Read before the signal: the child may run before `kill` returns.
    let resumed_at = LeaseInstant::now();
    child.signal("CONT");
    let mut late_acts = Vec::new();
    let refused = loop {
        let line = child.next_line(Duration::from_secs(30));
        if let Some(rest) = line.strip_prefix("ACT ") {
            let checked_at: u128 = rest.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
            if checked_at > ns(stopped_at) {
                late_acts.push(line.clone());
            }
            continue;
        }
        break line;
    };
    let put = child.next_line(Duration::from_secs(30));
    let refused_at: u128 = refused
        .strip_prefix("REFUSED ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    println!(
        "lease TTL {TTL:?}: standby won {} ms after the stop; first check after SIGCONT refused {} ms after it: {refused}; then: {put}",
        takeover.as_millis(),
        refused_at.saturating_sub(ns(resumed_at)) / 1_000_000
    );
    assert!(refused.starts_with("REFUSED "), "expected the refusal, got {refused:?}");
    assert!(late_acts.is_empty(), "actions checked after the pause began: {late_acts:?}");
    assert!(refused_at >= ns(resumed_at), "the refusal is the first check after the resume");
    assert_eq!(put, "PUT refused LeadershipLost");
    standby.put(&new, "owner", b"standby".to_vec()).await.expect("the new leader writes");
    assert_eq!(standby.get("owner").await.expect("get"), Some(b"standby".to_vec()));
}
