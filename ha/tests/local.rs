//! The local backend, including takeover from a leader in another OS process.
//!
//! The cross-process tests re-run this very test binary as the child process: with the
//! `KEEL_HA_CHILD_DIR` environment variable set, the `child_process_leader` test campaigns,
//! prints what it won and then waits to be killed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_ha::local::LocalHaServices;
use keel_ha::{HaServices, LeaderInfo, Leadership, Role};
use keel_proto::KeelError;
use tokio_util::sync::CancellationToken;

const JM: Role = Role::JobManager;
const RM: Role = Role::ResourceManager;
const CHILD_MARK: &str = "KEEL-HA-CHILD";

fn role_named(name: &str) -> Role {
    match name {
        "jobmanager" => JM,
        "resourcemanager" => RM,
        other => panic!("unknown role {other}"),
    }
}

/// Not a test of its own: the body of the child process (see the module docs). Without
/// `KEEL_HA_CHILD_DIR` it does nothing.
#[test]
fn child_process_leader() {
    let Ok(dir) = std::env::var("KEEL_HA_CHILD_DIR") else {
        return;
    };
    let cluster = std::env::var("KEEL_HA_CHILD_CLUSTER").expect("cluster");
    let roles = std::env::var("KEEL_HA_CHILD_ROLES").expect("roles");
    let address = std::env::var("KEEL_HA_CHILD_ADDRESS").expect("address");
    let put = std::env::var("KEEL_HA_CHILD_PUT").ok();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let ha = LocalHaServices::open(Path::new(&dir), &cluster).expect("open");
        let never = CancellationToken::new();
        let mut leaderships = Vec::new();
        for role in roles.split(',') {
            let l = ha.campaign(role_named(role), &address, &never).await.expect("campaign");
            println!("{CHILD_MARK} LEADER {role} {}", l.epoch);
            leaderships.push(l);
        }
        if let Some(put) = put {
            let (key, value) = put.split_once('=').expect("key=value");
            ha.put(&leaderships[0], key, value.as_bytes().to_vec()).await.expect("child put");
            println!("{CHILD_MARK} PUT {key}");
        }
        // Lead until killed.
        std::future::pending::<()>().await;
    });
}

/// A leader in a child process, killed on drop.
struct LeaderProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LeaderProcess {
    fn spawn(dir: &Path, cluster: &str, roles: &str, address: &str, put: Option<&str>) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.args(["child_process_leader", "--exact", "--nocapture", "--test-threads=1"])
            .env("KEEL_HA_CHILD_DIR", dir)
            .env("KEEL_HA_CHILD_CLUSTER", cluster)
            .env("KEEL_HA_CHILD_ROLES", roles)
            .env("KEEL_HA_CHILD_ADDRESS", address)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(put) = put {
            cmd.env("KEEL_HA_CHILD_PUT", put);
        }
        let mut child = cmd.spawn().expect("spawn child process");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                // The test harness may print "test child_process_leader ... " on the same line.
                if let Some(at) = line.find(CHILD_MARK) {
                    let rest = &line[at + CHILD_MARK.len()..];
                    if tx.send(rest.trim().to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        LeaderProcess { child, lines }
    }

    /// The next line the child reported, within `limit`.
    fn next_line(&mut self, limit: Duration) -> String {
        match self.lines.recv_timeout(limit) {
            Ok(line) => line,
            Err(e) => {
                let status = self.child.try_wait().ok().flatten();
                panic!("child process reported nothing within {limit:?} ({e}); exit status {status:?}")
            }
        }
    }

    /// Waits for the child to report leadership of `role` and returns its epoch.
    fn wait_leader(&mut self, role: &str) -> u64 {
        let line = self.next_line(Duration::from_secs(20));
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("LEADER"), "unexpected child line {line:?}");
        assert_eq!(parts.next(), Some(role), "unexpected child line {line:?}");
        parts.next().and_then(|e| e.parse().ok()).unwrap_or_else(|| panic!("bad line {line:?}"))
    }

    /// SIGKILL, then reap: when this returns the kernel has closed the child's files.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LeaderProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn with_timeout<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

/// Takeover across processes: a leader in a child process is SIGKILLed; the kernel drops its
/// lock and the standby waiting in this process wins with a higher epoch. Right after the kill
/// `leader()` reports no leader for a role nobody took over (even though the dead leader's
/// record is still on disk) and, for the role that was taken over, either no leader or the new
/// one, never the dead one. Once this process resigns and another process takes over, this
/// process's fenced writes are refused with `LeadershipLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_standby_takes_over_when_leader_process_is_killed_and_deposed_writes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let never = CancellationToken::new();
    let mut first = LeaderProcess::spawn(dir.path(), "c", "jobmanager,resourcemanager", "child-1:1", None);
    let child_jm = first.wait_leader("jobmanager");
    let child_rm = first.wait_leader("resourcemanager");

    let parent = Arc::new(LocalHaServices::open(dir.path(), "c").expect("open"));
    let observer = LocalHaServices::open(dir.path(), "c").expect("open");
    assert_eq!(
        observer.leader(JM).await.expect("leader"),
        Some(LeaderInfo { address: "child-1:1".into(), epoch: child_jm })
    );
    assert_eq!(
        observer.leader(RM).await.expect("leader"),
        Some(LeaderInfo { address: "child-1:1".into(), epoch: child_rm })
    );

    let mut standby = tokio::spawn({
        let parent = parent.clone();
        let never = never.clone();
        async move { parent.campaign(JM, "parent:1", &never).await }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut standby).await.is_err(),
        "the standby must wait while the child process leads"
    );

    first.kill();
    let killed_at = Instant::now();
    // Nobody campaigns for the resourcemanager: no leader, although its record is still there.
    assert!(dir.path().join("c/leader/resourcemanager.json").exists());
    assert_eq!(observer.leader(RM).await.expect("leader"), None);
    // The jobmanager: either not yet taken over, or taken over by this process; never the dead.
    match observer.leader(JM).await.expect("leader") {
        None => {}
        Some(info) => assert_eq!(info.address, "parent:1", "the dead leader must not be reported"),
    }

    let won = with_timeout(Duration::from_secs(10), "standby takeover", standby)
        .await
        .expect("join")
        .expect("campaign");
    println!("local takeover after SIGKILL: {:?}", killed_at.elapsed());
    assert!(won.epoch > child_jm, "epoch {} must exceed the dead leader's {child_jm}", won.epoch);
    assert_eq!(
        observer.leader(JM).await.expect("leader"),
        Some(LeaderInfo { address: "parent:1".into(), epoch: won.epoch })
    );
    parent.put(&won, "owner", b"parent".to_vec()).await.expect("leader writes");

    // Hand over to another process; afterwards this process cannot write any more.
    parent.resign(&won).await.expect("resign");
    let mut second = LeaderProcess::spawn(dir.path(), "c", "jobmanager", "child-2:1", Some("owner=child-2"));
    let second_epoch = second.wait_leader("jobmanager");
    assert!(second_epoch > won.epoch);
    assert_eq!(second.next_line(Duration::from_secs(20)), "PUT owner");

    let err = parent.put(&won, "owner", b"stale".to_vec()).await.expect_err("deposed");
    assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
    let unaware = Leadership::new(JM, won.epoch, "parent:1".into(), CancellationToken::new());
    let err = parent.put(&unaware, "owner", b"stale".to_vec()).await.expect_err("deposed");
    assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
    let err = parent.increment(&unaware, "counters/x").await.expect_err("deposed");
    assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
    assert_eq!(observer.get("owner").await.expect("get"), Some(b"child-2".to_vec()));
    assert_eq!(
        observer.leader(JM).await.expect("leader"),
        Some(LeaderInfo { address: "child-2:1".into(), epoch: second_epoch })
    );
}

/// Within one process, two backends on one directory behave like two processes: the second
/// campaigner waits, wins with a higher epoch after the first resigns, and the first one's
/// writes are refused from then on; `watch_leader` follows both changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_second_campaigner_wins_after_resign_and_watch_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let never = CancellationToken::new();
    let a = LocalHaServices::open(dir.path(), "c").expect("open");
    let b = Arc::new(LocalHaServices::open(dir.path(), "c").expect("open"));
    let stop = CancellationToken::new();
    let mut rx = b.watch_leader(JM, stop.clone());
    assert_eq!(*rx.borrow(), None);

    let la = a.campaign(JM, "a:1", &never).await.expect("a");
    with_timeout(
        Duration::from_secs(5),
        "watch sees a",
        rx.wait_for(|l| l.as_ref().map(|l| l.epoch) == Some(la.epoch)),
    )
    .await
    .expect("watch");
    let mut standby = tokio::spawn({
        let b = b.clone();
        let never = never.clone();
        async move { b.campaign(JM, "b:1", &never).await }
    });
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut standby).await.is_err());

    a.resign(&la).await.expect("resign");
    let lb = with_timeout(Duration::from_secs(5), "b wins", standby).await.expect("join").expect("b");
    assert!(lb.epoch > la.epoch);
    with_timeout(
        Duration::from_secs(5),
        "watch sees b",
        rx.wait_for(|l| l.as_ref().map(|l| l.epoch) == Some(lb.epoch)),
    )
    .await
    .expect("watch");
    assert_eq!(rx.borrow().clone(), Some(LeaderInfo { address: "b:1".into(), epoch: lb.epoch }));
    let err = a.put(&la, "k", b"x".to_vec()).await.expect_err("resigned");
    assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
    b.put(&lb, "k", b"b".to_vec()).await.expect("b writes");
    b.resign(&lb).await.expect("resign");
    with_timeout(Duration::from_secs(5), "watch sees no leader", rx.wait_for(Option::is_none))
        .await
        .expect("watch");
    stop.cancel();
}

/// A campaign that cannot win returns `Cancelled` once its shutdown token fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_campaign_returns_cancelled_on_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = LocalHaServices::open(dir.path(), "c").expect("open");
    let b = LocalHaServices::open(dir.path(), "c").expect("open");
    let _la = a.campaign(RM, "a:1", &CancellationToken::new()).await.expect("a");
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stopper.cancel();
    });
    let err = with_timeout(Duration::from_secs(5), "cancelled campaign", b.campaign(RM, "b:1", &stop))
        .await
        .expect_err("cancelled");
    assert!(matches!(err, KeelError::Cancelled { .. }), "{err:?}");
}

/// An HA directory that cannot be created is reported as `KeelError::Ha` naming the path.
#[test]
fn local_open_fails_with_ha_error_naming_an_unusable_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let err = LocalHaServices::open(&file, "c").expect_err("a file is no directory");
    match &err {
        KeelError::Ha { reason } => {
            assert!(reason.contains(&file.display().to_string()), "{reason}")
        }
        other => panic!("expected Ha, got {other:?}"),
    }
    let err = LocalHaServices::open(dir.path(), "../escape").expect_err("bad cluster id");
    assert!(matches!(err, KeelError::InvalidArgument { .. }), "{err:?}");
}
