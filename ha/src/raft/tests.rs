//! The Raft backend end to end inside one test process: three members with their gRPC services
//! on loopback, their data in temporary directories, and [`RaftHaServices`] clients, under
//! member faults (a member stopped and started again from its directory, a member cut off).
//! Real time, real sockets, real fsyncs.

use std::time::Duration;

use keel_proto::{KeelError, Result};
use tokio_util::sync::CancellationToken;

use super::node::Timing;
use super::testing::{err, wait_for, LocalGroup, LONG};
use crate::{HaServices, Leadership, LeaseInstant, Role};

/// Waits until `leadership`'s deadline lies beyond `past`: a keep-alive sent after `past` was
/// acknowledged by the group.
async fn renewed_after(leadership: &Leadership, past: LeaseInstant) -> Result<()> {
    wait_for("a keep-alive acknowledged after the fault", || async {
        let ttl_after = leadership.deadline().is_some_and(|d| d > past);
        ttl_after.then_some(())
    })
    .await
}

/// A deposed leader's fenced write never applies: leader A's session is left to expire (its
/// keep-alives stopped), B wins with a greater epoch and writes; then A writes with its old
/// epoch through a leadership whose local deadline check still passes (as a leader paused
/// between its check and its write), and the store refuses it: `LeadershipLost`, and the key
/// keeps B's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_fenced_write_never_applies() -> Result<()> {
    let dir = tempfile::tempdir().map_err(err)?;
    let group = LocalGroup::start(dir.path(), 3, Timing::default()).await?;
    let ttl = Duration::from_secs(1);
    let a = group.client(ttl).await?;
    let b = group.client(Duration::from_secs(10)).await?;
    let never = CancellationToken::new();
    let la = a.campaign(Role::JobManager, "a:1", &never).await?;
    a.put(&la, "jobs/x", b"from a".to_vec()).await?;
    assert!(a.stop_keep_alive_for_tests(Role::JobManager));
    let lb = tokio::time::timeout(LONG, b.campaign(Role::JobManager, "b:1", &never)).await.map_err(err)??;
    assert!(lb.epoch > la.epoch, "epochs grow: {} then {}", la.epoch, lb.epoch);
    b.put(&lb, "jobs/x", b"from b".to_vec()).await?;
    // A's own check refuses once its deadline passed...
    assert!(matches!(a.put(&la, "jobs/x", b"stale".to_vec()).await, Err(KeelError::LeadershipLost { .. })));
    // ...and the store refuses even a write whose local check passed.
    let unchecked = Leadership::new(Role::JobManager, la.epoch, "a:1".into(), CancellationToken::new());
    for result in [
        a.put(&unchecked, "jobs/x", b"stale".to_vec()).await.map(|_| 0),
        a.delete(&unchecked, "jobs/x").await.map(|_| 0),
        a.increment(&unchecked, "counter").await,
    ] {
        assert!(matches!(result, Err(KeelError::LeadershipLost { .. })), "{result:?}");
    }
    assert_eq!(b.get("jobs/x").await?, Some(b"from b".to_vec()));
    assert_eq!(b.get("counter").await?, None);
    assert_eq!(b.leader(Role::JobManager).await?.map(|l| l.epoch), Some(lb.epoch));
    Ok(())
}

/// Losing one member of three changes no role's leader: the Raft leader is stopped while a
/// JobManager and a ResourceManager lead (lease TTL 6 s, as in `tests/tests/store_faults.rs`: the
/// test must hold on a loaded 2-core machine, where fsyncs and elections slow down); the remaining two elect a new Raft
/// leader, both leaderships get a keep-alive acknowledged after the loss, keep their epochs and
/// were never given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_member_of_three_changes_no_roles_leader() -> Result<()> {
    let dir = tempfile::tempdir().map_err(err)?;
    let mut group = LocalGroup::start(dir.path(), 3, Timing::default()).await?;
    let ha = group.client(Duration::from_secs(6)).await?;
    let never = CancellationToken::new();
    let jm = ha.campaign(Role::JobManager, "jm:1", &never).await?;
    let rm = ha.campaign(Role::ResourceManager, "rm:1", &never).await?;
    let raft_leader = group.leader().await?;
    let lost_at = LeaseInstant::now();
    group.stop(raft_leader).await?;
    let new_leader = group.leader().await?;
    assert_ne!(new_leader, raft_leader);
    renewed_after(&jm, lost_at + Duration::from_secs(6)).await?;
    renewed_after(&rm, lost_at + Duration::from_secs(6)).await?;
    assert!(!jm.lost().is_cancelled() && !rm.lost().is_cancelled(), "a leadership was given up");
    assert_eq!(ha.leader(Role::JobManager).await?.map(|l| l.epoch), Some(jm.epoch));
    assert_eq!(ha.leader(Role::ResourceManager).await?.map(|l| l.epoch), Some(rm.epoch));
    ha.put(&jm, "still", b"leading".to_vec()).await?;
    // The stopped member comes back and catches up.
    group.restart(raft_leader).await?;
    let target = group.status(new_leader).await.map(|s| s.commit_index).unwrap_or(0);
    wait_for("the restarted member to catch up", || async {
        group.status(raft_leader).await.is_some_and(|s| s.applied_index >= target).then_some(())
    })
    .await?;
    Ok(())
}

/// A Raft leader member that hangs (its Ready loop frozen, as a process stopped with SIGSTOP,
/// while its socket still takes requests) costs no role its leader: the clients' keep-alives
/// stop waiting for it and reach the member elected in its place, so the leadership is renewed
/// past the moment the freeze began plus the TTL (which it could not be if every keep-alive
/// kept going to the frozen member), and keeps its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_raft_leader_costs_no_role_its_leader() -> Result<()> {
    let dir = tempfile::tempdir().map_err(err)?;
    let group = LocalGroup::start(dir.path(), 3, Timing::default()).await?;
    let ttl = Duration::from_secs(6);
    let ha = group.client(ttl).await?;
    let never = CancellationToken::new();
    let jm = ha.campaign(Role::JobManager, "jm:1", &never).await?;
    let raft_leader = group.leader().await?;
    let frozen_at = LeaseInstant::now();
    group.freeze(raft_leader, true);
    let new_leader = group.leader().await?;
    assert_ne!(new_leader, raft_leader);
    renewed_after(&jm, frozen_at + ttl).await?;
    assert!(!jm.lost().is_cancelled(), "the leadership was given up");
    assert_eq!(ha.leader(Role::JobManager).await?.map(|l| l.epoch), Some(jm.epoch));
    group.freeze(raft_leader, false);
    Ok(())
}

/// Losing a majority makes every leader step down: with two of three members stopped no
/// keep-alive is acknowledged, so both leaderships end (their `lost` tokens fire) by their
/// deadlines. When the majority returns, a campaign wins again with a greater epoch, and what
/// was written before is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_majority_makes_leaders_step_down_and_the_group_recovers() -> Result<()> {
    let dir = tempfile::tempdir().map_err(err)?;
    let mut group = LocalGroup::start(dir.path(), 3, Timing::default()).await?;
    let ha = group.client(Duration::from_secs(1)).await?;
    let never = CancellationToken::new();
    let jm = ha.campaign(Role::JobManager, "jm:1", &never).await?;
    let rm = ha.campaign(Role::ResourceManager, "rm:1", &never).await?;
    ha.put(&jm, "before", b"1".to_vec()).await?;
    group.stop(0).await?;
    group.stop(1).await?;
    tokio::time::timeout(LONG, jm.lost().cancelled()).await.map_err(err)?;
    tokio::time::timeout(LONG, rm.lost().cancelled()).await.map_err(err)?;
    assert!(jm.check().is_err() && rm.check().is_err());
    group.restart(0).await?;
    group.restart(1).await?;
    let again =
        tokio::time::timeout(LONG, ha.campaign(Role::JobManager, "jm:2", &never)).await.map_err(err)??;
    assert!(again.epoch > jm.epoch.max(rm.epoch));
    assert_eq!(ha.get("before").await?, Some(b"1".to_vec()));
    Ok(())
}

/// A member that was down while the log was compacted catches up from a snapshot, and one that
/// is restarted recovers its own state from disk: with a snapshot every 20 entries, member 3
/// is stopped, 100 writes are made, and it is started again; it reaches the leader's applied
/// index, and its snapshot index shows it installed a snapshot rather than replaying entries it
/// no longer had. Then the old leader is cut off, and a linearizable read through the new one
/// (of the two others) sees the last write; every member's disk use stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_was_down_catches_up_from_a_snapshot() -> Result<()> {
    let timing = Timing { snapshot_every: 20, ..Timing::default() };
    let dir = tempfile::tempdir().map_err(err)?;
    let mut group = LocalGroup::start(dir.path(), 3, timing).await?;
    let ha = group.client(Duration::from_secs(30)).await?;
    let never = CancellationToken::new();
    let jm = ha.campaign(Role::JobManager, "jm:1", &never).await?;
    group.stop(2).await?;
    for i in 0..100u32 {
        ha.put(&jm, "n", i.to_string().into_bytes()).await?;
    }
    let leader = group.leader().await?;
    let target = group.status(leader).await.map(|s| s.applied_index).unwrap_or(0);
    group.restart(2).await?;
    let caught_up = wait_for("member 3 to catch up", || async {
        group.status(2).await.filter(|s| s.applied_index >= target)
    })
    .await?;
    assert!(caught_up.snapshot_index > 0, "no snapshot was installed: {caught_up:?}");
    group.isolate(leader, true);
    let new_leader = group.leader().await?;
    assert_ne!(new_leader, leader);
    assert_eq!(ha.get("n").await?, Some(b"99".to_vec()));
    // Disk use stays bounded: each member's files hold at most a snapshot's worth of log.
    for i in 0..3 {
        if let Some(s) = group.status(i).await {
            assert!(s.disk_bytes < 64 * 1024, "member {} uses {} bytes", i + 1, s.disk_bytes);
        }
    }
    Ok(())
}

/// A deposed Raft leader serves no stale read: the leader's Ready loop is frozen (as a member
/// stopped with SIGSTOP) and cut off from the other members, the two others elect a new leader,
/// and a write through it completes. A read sent to the frozen member meanwhile waits in its
/// queue; once it is thawed (still cut off, so it has heard of no newer term), it must not answer
/// with the value from before the write (a read answered from its own state, without confirming
/// its leadership with a quorum, would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_deposed_leader_serves_no_stale_read() -> Result<()> {
    let dir = tempfile::tempdir().map_err(err)?;
    let group = LocalGroup::start(dir.path(), 3, Timing::default()).await?;
    let ha = group.client(Duration::from_secs(30)).await?;
    let never = CancellationToken::new();
    let jm = ha.campaign(Role::JobManager, "jm:1", &never).await?;
    ha.put(&jm, "k", b"old".to_vec()).await?;
    let old_leader = group.leader().await?;
    let old = group.running[old_leader].as_ref().ok_or_else(|| err("member gone"))?;
    old.member.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    old.member.isolation.set(true);
    ha.put(&jm, "k", b"new".to_vec()).await?;
    // The read is in the frozen member's queue before it thaws (sent without waiting).
    let (reply, read) = tokio::sync::oneshot::channel();
    let query = super::machine::Query::Get { key: "test/meta/k".into() };
    old.member.node.tx.send(super::node::Input::Read { query, reply }).map_err(err)?;
    old.member.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    let answer = tokio::time::timeout(Duration::from_secs(10), read).await;
    let stale = super::machine::Reply::Value { value: Some(b"old".to_vec()) };
    assert!(
        !matches!(&answer, Ok(Ok(Ok(r))) if *r == stale),
        "the resumed old leader answered a stale read: {answer:?}"
    );
    assert_eq!(ha.get("k").await?, Some(b"new".to_vec()));
    Ok(())
}

/// A small xorshift for the workload's choices (reproducible from its seed).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The HA store stays linearizable under member faults: four clients put, delete, read and
/// increment five keys through one leadership while the Raft leader is cut off and healed, a
/// follower is stopped and restarted, and the leader is stopped and restarted. Every answer and
/// every timeout is recorded, and the history is checked by
/// [`crate::linearizability::check`] (a stale read, a lost or doubled write, or a counter that
/// skipped or repeated a value would fail it). A refused write counts as not applied, a request
/// that failed otherwise as unknown (it may have applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_linearizable_under_member_faults() -> Result<()> {
    use crate::linearizability::{check, History, Op, Outcome};

    let dir = tempfile::tempdir().map_err(err)?;
    let mut group =
        LocalGroup::start(dir.path(), 3, Timing { snapshot_every: 50, ..Timing::default() }).await?;
    let owner = group.client(Duration::from_secs(60)).await?;
    let never = CancellationToken::new();
    let leadership = owner.campaign(Role::JobManager, "jm:1", &never).await?;
    let history = History::new();
    let stop = CancellationToken::new();
    let keys = ["a", "b", "c", "n", "m"];
    let mut workers = Vec::new();
    for client in 0..4u64 {
        let ha = group.client(Duration::from_secs(60)).await?;
        let (history, stop, leadership) = (history.clone(), stop.clone(), leadership.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (client + 1));
            let mut seq = 0u64;
            while !stop.is_cancelled() {
                seq += 1;
                let key = keys[usize::try_from(rng.below(keys.len() as u64)).unwrap_or(0)].to_string();
                let counter = key == "n" || key == "m";
                let op = match (counter, rng.below(4)) {
                    (true, 0) => Op::Get { key },
                    (true, _) => Op::Increment { key },
                    (false, 0) => Op::Delete { key },
                    (false, 1) | (false, 2) => Op::Get { key },
                    (false, _) => Op::Put { key, value: format!("{client}-{seq}").into_bytes() },
                };
                let pending = history.begin(client, op.clone());
                let answer = tokio::time::timeout(Duration::from_secs(10), async {
                    match &op {
                        Op::Put { key, value } => {
                            ha.put(&leadership, key, value.clone()).await.map(|_| Outcome::Done)
                        }
                        Op::Delete { key } => ha.delete(&leadership, key).await.map(|_| Outcome::Done),
                        Op::Get { key } => ha.get(key).await.map(Outcome::Value),
                        Op::Increment { key } => ha.increment(&leadership, key).await.map(Outcome::Counter),
                    }
                })
                .await;
                pending.finish(match answer {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(KeelError::LeadershipLost { .. })) => Outcome::Failed,
                    Ok(Err(_)) | Err(_) => Outcome::Unknown,
                });
            }
            ha
        }));
    }
    // The faults, one after the other, each healed before the next.
    let mut injected = Vec::new();
    for round in 0..4 {
        let leader = group.leader().await?;
        match round {
            3 => {
                // The leader stands still (as if stopped with SIGSTOP) while the others elect a
                // new one and a write completes there; reads sent straight to the frozen member
                // meanwhile are answered only after it thaws, and are part of the history.
                group.freeze(leader, true);
                group.isolate(leader, true);
                group.leader().await?;
                let write = history.begin(99, Op::Put { key: "a".into(), value: b"frozen-write".to_vec() });
                match owner.put(&leadership, "a", b"frozen-write".to_vec()).await {
                    Ok(()) => write.finish(Outcome::Done),
                    Err(_) => write.finish(Outcome::Unknown),
                }
                let node =
                    group.running[leader].as_ref().ok_or_else(|| err("member gone"))?.member.node.clone();
                let mut reads = Vec::new();
                for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
                    // Queued at the frozen member now (sent without waiting), answered once it thaws.
                    let pending = history.begin(100 + i as u64, Op::Get { key: key.into() });
                    let query = super::machine::Query::Get { key: format!("test/meta/{key}") };
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    node.tx.send(super::node::Input::Read { query, reply }).map_err(err)?;
                    reads.push(tokio::spawn(async move {
                        match answer.await {
                            Ok(Ok(super::machine::Reply::Value { value })) => {
                                pending.finish(Outcome::Value(value))
                            }
                            _ => pending.finish(Outcome::Unknown),
                        }
                    }));
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                // Thawed but still cut off: it hears of no newer term before it handles the reads.
                group.freeze(leader, false);
                for r in reads {
                    tokio::time::timeout(LONG, r).await.map_err(err)?.map_err(err)?;
                }
                group.isolate(leader, false);
                injected.push("raft leader frozen and cut off, direct reads queued, thawed, healed");
            }
            0 => {
                group.isolate(leader, true);
                group.leader().await?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                group.isolate(leader, false);
                injected.push("raft leader cut off, then healed");
            }
            1 => {
                let follower = (leader + 1) % 3;
                group.stop(follower).await?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                group.restart(follower).await?;
                injected.push("follower stopped, then restarted");
            }
            _ => {
                group.stop(leader).await?;
                group.leader().await?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                group.restart(leader).await?;
                injected.push("raft leader stopped, then restarted");
            }
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop.cancel();
    for w in workers {
        w.await.map_err(err)?;
    }
    let operations = history.operations();
    let answered =
        operations.iter().filter(|o| !matches!(o.outcome, Outcome::Unknown | Outcome::Failed)).count();
    let unknown = operations.iter().filter(|o| o.outcome == Outcome::Unknown).count();
    println!("{} operations ({answered} answered, {unknown} unknown) under: {injected:?}", operations.len());
    assert!(answered >= 100, "too few operations were answered to prove anything: {answered}");
    if let Err(violation) = check(&operations) {
        panic!("not linearizable: {violation}");
    }
    Ok(())
}
