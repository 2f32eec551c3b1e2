//! An in-memory HA backend for tests, with switches that inject faults.
//!
//! [`MemoryHaServices`] keeps everything in one process's memory; its clones share one store, so
//! several "processes" of a test (a leader and its standbys) each take a clone, as they would
//! each connect to one etcd. It is selected in code only (there is no configuration for it) and
//! gives the guarantees of the real backends:
//!
//! - every new leadership of any role gets an epoch greater than every earlier one (one counter
//!   for the store, as etcd's revision);
//! - a role has at most one leader; a candidate waits until the role is vacant (resign, a lost
//!   lease) and then wins;
//! - every leader-only write (`put`, `delete`, `increment`) is applied only if its leadership is
//!   still the role's current one in the store *and* [`Leadership::check`] passes; otherwise it
//!   is refused with `LeadershipLost` and changes nothing;
//! - `watch_leader` follows the current leader of a role.
//!
//! Fault switches, for tests of what a role does when the HA services misbehave:
//!
//! - [`MemoryHaServices::lose_lease`]: the role's leadership ends as when its lease expires: the
//!   role becomes vacant, the leadership's `lost()` token fires, and every later fenced write of
//!   that leadership is refused.
//! - [`MemoryHaServices::lose_lease_unnoticed`]: the role becomes vacant but the token does not
//!   fire, as for a leader that was paused or cut off and has not found out yet: only the store's
//!   fence refuses its writes.
//! - [`MemoryHaServices::fail_next_writes`]: the next `n` leader-only writes fail with
//!   `Unavailable` and are not applied.
//! - [`MemoryHaServices::delay_watches`]: watches of the leader deliver each change only after a
//!   delay (on tokio's clock, so paused-time tests control it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use keel_proto::{KeelError, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::{self, Clock};
use crate::keys::{validate_key, validate_prefix};
use crate::{HaServices, LeaderInfo, Leadership, Role};

/// The address named in the `Unavailable` errors of injected write failures.
const ADDRESS: &str = "memory";

/// HA services in memory, for tests. See the module documentation.
#[derive(Clone)]
pub struct MemoryHaServices {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// The leader of each role as the store holds it (not delayed).
    leaders: HashMap<Role, watch::Sender<Option<LeaderInfo>>>,
    clock: Arc<dyn Clock>,
}

struct Current {
    info: LeaderInfo,
    token: CancellationToken,
}

#[derive(Default)]
struct State {
    /// The last epoch handed out, for any role.
    last_epoch: u64,
    current: HashMap<Role, Current>,
    meta: BTreeMap<String, Vec<u8>>,
    /// How many of the next leader-only writes to fail.
    failing_writes: u32,
    /// How long watches of the leader hold back each change.
    watch_delay: Duration,
}

impl std::fmt::Debug for MemoryHaServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("MemoryHaServices")
            .field("last_epoch", &state.last_epoch)
            .field("keys", &state.meta.len())
            .finish()
    }
}

impl Default for MemoryHaServices {
    fn default() -> Self {
        MemoryHaServices::new()
    }
}

impl MemoryHaServices {
    /// An empty store whose leaderships read the system clock.
    pub fn new() -> Self {
        MemoryHaServices::with_clock(clock::system())
    }

    /// An empty store whose leaderships read `clock` (their deadlines, if any, and the
    /// leader's own checks).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        let leaders = [Role::ResourceManager, Role::JobManager]
            .into_iter()
            .map(|role| (role, watch::channel(None).0))
            .collect();
        MemoryHaServices { inner: Arc::new(Inner { state: Mutex::new(State::default()), leaders, clock }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn leader_tx(&self, role: Role) -> Result<&watch::Sender<Option<LeaderInfo>>> {
        self.inner
            .leaders
            .get(&role)
            .ok_or_else(|| KeelError::internal(format!("memory HA has no leader slot for {role}")))
    }

    /// Makes `role` vacant; `notify` fires the old leadership's token. Returns the epoch that
    /// was current, if any.
    fn vacate(&self, role: Role, notify: bool) -> Option<u64> {
        let old = self.state().current.remove(&role);
        let old = old?;
        if notify {
            old.token.cancel();
        }
        if let Ok(tx) = self.leader_tx(role) {
            tx.send_replace(None);
        }
        Some(old.info.epoch)
    }

    /// Fault switch: the current leadership of `role` ends as when its lease expires (the role
    /// becomes vacant and the leadership's `lost()` token fires). Returns its epoch, if there
    /// was a leader.
    pub fn lose_lease(&self, role: Role) -> Option<u64> {
        let epoch = self.vacate(role, true);
        tracing::info!(%role, ?epoch, "memory HA: lease lost (fault switch)");
        epoch
    }

    /// Fault switch: the current leadership of `role` ends in the store (the role becomes
    /// vacant) but its holder is not told: its token does not fire, and only the store's fence
    /// refuses its writes. Returns its epoch, if there was a leader.
    pub fn lose_lease_unnoticed(&self, role: Role) -> Option<u64> {
        let epoch = self.vacate(role, false);
        tracing::info!(%role, ?epoch, "memory HA: lease lost without the leader noticing (fault switch)");
        epoch
    }

    /// Fault switch: the next `n` leader-only writes (`put`, `delete`, `increment`) fail with
    /// `Unavailable` and change nothing. Replaces any count still pending.
    pub fn fail_next_writes(&self, n: u32) {
        self.state().failing_writes = n;
    }

    /// Fault switch: from now on, watches of the leader made by [`HaServices::watch_leader`]
    /// deliver each change `delay` after it happened (on tokio's clock). Zero turns it off.
    /// Applies to changes that happen after the call.
    pub fn delay_watches(&self, delay: Duration) {
        self.state().watch_delay = delay;
    }

    /// The last epoch handed out (0 before the first election).
    pub fn last_epoch(&self) -> u64 {
        self.state().last_epoch
    }

    /// Refuses unless `leadership` is current (in the store and by its own check), and takes
    /// one injected failure if any is pending; then runs `op` on the state, under the lock.
    fn fenced<T>(&self, leadership: &Leadership, op: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        leadership.check()?;
        let mut state = self.state();
        let held = state
            .current
            .get(&leadership.role)
            .is_some_and(|c| c.info.epoch == leadership.epoch && !c.token.is_cancelled());
        if !held {
            drop(state);
            leadership.give_up();
            return Err(KeelError::LeadershipLost {
                reason: format!(
                    "{} leadership of epoch {} is no longer the current one in the HA store",
                    leadership.role, leadership.epoch
                ),
            });
        }
        if state.failing_writes > 0 {
            state.failing_writes -= 1;
            return Err(KeelError::unavailable(ADDRESS, "injected write failure (fault switch)"));
        }
        op(&mut state)
    }
}

#[async_trait]
impl HaServices for MemoryHaServices {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    async fn campaign(&self, role: Role, address: &str, shutdown: &CancellationToken) -> Result<Leadership> {
        let mut changes = self.leader_tx(role)?.subscribe();
        loop {
            // Marked seen before the state is read, so a vacancy after the read wakes us.
            changes.borrow_and_update();
            if shutdown.is_cancelled() {
                return Err(KeelError::Cancelled {
                    reason: format!("campaign for {role} leadership stopped"),
                });
            }
            {
                let mut state = self.state();
                if !state.current.contains_key(&role) {
                    state.last_epoch += 1;
                    let epoch = state.last_epoch;
                    let token = CancellationToken::new();
                    let info = LeaderInfo { address: address.to_string(), epoch };
                    state.current.insert(role, Current { info: info.clone(), token: token.clone() });
                    drop(state);
                    self.leader_tx(role)?.send_replace(Some(info));
                    // A leadership given up by its holder (`give_up`, shutdown) frees the role.
                    let this = self.clone();
                    let watched = token.clone();
                    tokio::spawn(async move {
                        watched.cancelled().await;
                        let mut state = this.state();
                        if state.current.get(&role).is_some_and(|c| c.info.epoch == epoch) {
                            state.current.remove(&role);
                            drop(state);
                            if let Ok(tx) = this.leader_tx(role) {
                                tx.send_replace(None);
                            }
                        }
                    });
                    tracing::info!(%role, epoch, address, "memory leadership won");
                    return Ok(Leadership::new(role, epoch, address.to_string(), token)
                        .on_clock(self.inner.clock.clone()));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                changed = changes.changed() => {
                    changed.map_err(|_| KeelError::internal("memory HA leader channel closed"))?;
                }
            }
        }
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        leadership.give_up();
        let role = leadership.role;
        let mut state = self.state();
        if state.current.get(&role).is_some_and(|c| c.info.epoch == leadership.epoch) {
            state.current.remove(&role);
            drop(state);
            self.leader_tx(role)?.send_replace(None);
        }
        Ok(())
    }

    async fn leader(&self, role: Role) -> Result<Option<LeaderInfo>> {
        Ok(self.state().current.get(&role).map(|c| c.info.clone()))
    }

    fn watch_leader(&self, role: Role, shutdown: CancellationToken) -> watch::Receiver<Option<LeaderInfo>> {
        let current = self.state().current.get(&role).map(|c| c.info.clone());
        let (tx, rx) = watch::channel(current);
        let Ok(source) = self.leader_tx(role) else {
            return rx;
        };
        let mut source = source.subscribe();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = source.changed() => if changed.is_err() { return },
                }
                let delay = this.state().watch_delay;
                if !delay.is_zero() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                let value = source.borrow_and_update().clone();
                tx.send_if_modified(|v| {
                    if *v != value {
                        *v = value;
                        true
                    } else {
                        false
                    }
                });
            }
        });
        rx
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        validate_key(key)?;
        Ok(self.state().meta.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        validate_prefix(prefix)?;
        let state = self.state();
        Ok(state
            .meta
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn put(&self, leadership: &Leadership, key: &str, value: Vec<u8>) -> Result<()> {
        validate_key(key)?;
        self.fenced(leadership, |state| {
            state.meta.insert(key.to_string(), value);
            Ok(())
        })
    }

    async fn delete(&self, leadership: &Leadership, key: &str) -> Result<()> {
        validate_key(key)?;
        self.fenced(leadership, |state| {
            state.meta.remove(key);
            Ok(())
        })
    }

    async fn increment(&self, leadership: &Leadership, key: &str) -> Result<u64> {
        validate_key(key)?;
        self.fenced(leadership, |state| {
            let current = match state.meta.get(key) {
                None => 0,
                Some(bytes) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| KeelError::ha(format!("counter {key} is not a decimal number")))?,
            };
            let next =
                current.checked_add(1).ok_or_else(|| KeelError::ha(format!("counter {key} overflowed")))?;
            state.meta.insert(key.to_string(), next.to_string().into_bytes());
            Ok(next)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use crate::Counter;

    const JM: Role = Role::JobManager;
    const RM: Role = Role::ResourceManager;

    fn never() -> CancellationToken {
        CancellationToken::new()
    }

    /// Epochs grow across roles and across leaderships of one role.
    #[tokio::test(start_paused = true)]
    async fn epochs_grow() -> Result<()> {
        let ha = MemoryHaServices::new();
        let a = ha.campaign(JM, "a:1", &never()).await?;
        let b = ha.campaign(RM, "b:1", &never()).await?;
        assert!(b.epoch > a.epoch);
        ha.resign(&a).await?;
        let c = ha.campaign(JM, "c:1", &never()).await?;
        assert!(c.epoch > b.epoch);
        assert_eq!(ha.last_epoch(), c.epoch);
        assert_eq!(ha.leader(JM).await?, Some(LeaderInfo { address: "c:1".into(), epoch: c.epoch }));
        Ok(())
    }

    /// A role has one leader: a second candidate (another clone of the store, as another
    /// process) waits while the role is held and wins once the leader resigns.
    #[tokio::test(start_paused = true)]
    async fn second_candidate_waits_for_vacancy() -> Result<()> {
        let ha = MemoryHaServices::new();
        let standby = ha.clone();
        let first = ha.campaign(JM, "a:1", &never()).await?;
        let mut waiting = tokio::spawn(async move { standby.campaign(JM, "b:1", &never()).await });
        // Under paused time the runtime jumps to the timeout only once every task is idle, so
        // the candidate has had every chance to (wrongly) win by then.
        let early = tokio::time::timeout(Duration::from_secs(60), &mut waiting).await;
        assert!(early.is_err(), "the second candidate must not win while the role is held");
        assert_eq!(ha.leader(JM).await?.map(|l| l.epoch), Some(first.epoch));
        ha.resign(&first).await?;
        let second = waiting.await.map_err(|e| KeelError::internal(e.to_string()))??;
        assert!(second.epoch > first.epoch);
        assert!(first.lost().is_cancelled());
        Ok(())
    }

    /// Giving a leadership up (its token) frees the role for a standby, as the local backend's
    /// lock release does.
    #[tokio::test(start_paused = true)]
    async fn give_up_frees_the_role() -> Result<()> {
        let ha = MemoryHaServices::new();
        let first = ha.campaign(JM, "a:1", &never()).await?;
        first.give_up();
        let second = tokio::time::timeout(Duration::from_secs(5), ha.campaign(JM, "b:1", &never()))
            .await
            .map_err(|_| KeelError::internal("the standby never won"))??;
        assert!(second.epoch > first.epoch);
        Ok(())
    }

    /// A campaign stops with `Cancelled` when its shutdown token fires.
    #[tokio::test(start_paused = true)]
    async fn campaign_stops_on_shutdown() -> Result<()> {
        let ha = MemoryHaServices::new();
        let _held = ha.campaign(JM, "a:1", &never()).await?;
        let shutdown = CancellationToken::new();
        let waiting = tokio::spawn({
            let (ha, shutdown) = (ha.clone(), shutdown.clone());
            async move { ha.campaign(JM, "b:1", &shutdown).await }
        });
        shutdown.cancel();
        let result = waiting.await.map_err(|e| KeelError::internal(e.to_string()))?;
        assert!(matches!(result, Err(KeelError::Cancelled { .. })), "{result:?}");
        Ok(())
    }

    /// Fenced writes apply for the current leader, and writes of a superseded leadership are
    /// refused and change nothing; reads and lists see what was written, sorted by key.
    #[tokio::test(start_paused = true)]
    async fn fenced_writes_and_reads() -> Result<()> {
        let ha = MemoryHaServices::new();
        let old = ha.campaign(JM, "a:1", &never()).await?;
        ha.put(&old, "jobs/b", b"2".to_vec()).await?;
        ha.put(&old, "jobs/a", b"1".to_vec()).await?;
        ha.put(&old, "other", b"x".to_vec()).await?;
        assert_eq!(ha.get("jobs/a").await?, Some(b"1".to_vec()));
        let listed = ha.list("jobs/").await?;
        assert_eq!(listed, vec![("jobs/a".into(), b"1".to_vec()), ("jobs/b".into(), b"2".to_vec())]);
        assert_eq!(ha.list("").await?.len(), 3);
        ha.delete(&old, "other").await?;
        assert_eq!(ha.get("other").await?, None);

        // The old leader is not told; the store's fence refuses it all the same.
        let unaware = Leadership::new(JM, old.epoch, "a:1".into(), CancellationToken::new());
        ha.resign(&old).await?;
        let new = ha.campaign(JM, "b:1", &never()).await?;
        let refused = ha.put(&unaware, "jobs/a", b"stale".to_vec()).await;
        assert!(matches!(refused, Err(KeelError::LeadershipLost { .. })), "{refused:?}");
        assert!(unaware.lost().is_cancelled(), "a refused write gives the leadership up");
        assert_eq!(ha.get("jobs/a").await?, Some(b"1".to_vec()));
        ha.put(&new, "jobs/a", b"3".to_vec()).await?;
        assert_eq!(ha.get("jobs/a").await?, Some(b"3".to_vec()));
        assert!(matches!(ha.get("/abs").await, Err(KeelError::InvalidArgument { .. })));
        Ok(())
    }

    /// Counters start at 1, count up, are fenced, and continue across leaderships.
    #[tokio::test(start_paused = true)]
    async fn counters_count_and_are_fenced() -> Result<()> {
        let ha: Arc<dyn HaServices> = Arc::new(MemoryHaServices::new());
        let l = ha.campaign(JM, "a:1", &never()).await?;
        let counter = Counter::new(ha.clone(), "counters/checkpoints");
        assert_eq!(counter.next(&l).await?, 1);
        assert_eq!(counter.next(&l).await?, 2);
        ha.resign(&l).await?;
        assert!(matches!(counter.next(&l).await, Err(KeelError::LeadershipLost { .. })));
        let m = ha.campaign(JM, "b:1", &never()).await?;
        assert_eq!(counter.next(&m).await?, 3);
        Ok(())
    }

    /// The leader watch follows the role: current leader at once, vacancy, the next leader.
    #[tokio::test(start_paused = true)]
    async fn watch_follows_the_leader() -> Result<()> {
        let ha = MemoryHaServices::new();
        let a = ha.campaign(JM, "a:1", &never()).await?;
        let mut rx = ha.watch_leader(JM, never());
        assert_eq!(rx.borrow_and_update().as_ref().map(|l| l.epoch), Some(a.epoch));
        ha.resign(&a).await?;
        rx.changed().await.map_err(|e| KeelError::internal(e.to_string()))?;
        assert_eq!(*rx.borrow_and_update(), None);
        let b = ha.campaign(JM, "b:1", &never()).await?;
        rx.changed().await.map_err(|e| KeelError::internal(e.to_string()))?;
        assert_eq!(rx.borrow_and_update().as_ref().map(|l| l.address.clone()), Some("b:1".into()));
        assert_eq!(rx.borrow().as_ref().map(|l| l.epoch), Some(b.epoch));
        Ok(())
    }

    /// `lose_lease`: the role becomes vacant, the leadership's token fires, its later fenced
    /// writes are refused, and a standby can win with a greater epoch.
    #[tokio::test(start_paused = true)]
    async fn switch_lose_lease() -> Result<()> {
        let ha = MemoryHaServices::new();
        let l = ha.campaign(JM, "a:1", &never()).await?;
        assert_eq!(ha.lose_lease(JM), Some(l.epoch));
        assert!(l.lost().is_cancelled());
        assert!(l.check().is_err());
        assert!(matches!(ha.put(&l, "k", b"v".to_vec()).await, Err(KeelError::LeadershipLost { .. })));
        assert_eq!(ha.get("k").await?, None);
        assert_eq!(ha.leader(JM).await?, None);
        let next = ha.campaign(JM, "b:1", &never()).await?;
        assert!(next.epoch > l.epoch);
        assert_eq!(ha.lose_lease(RM), None, "no leader of that role");
        Ok(())
    }

    /// `lose_lease_unnoticed`: the leader's own check still passes (it was not told), but the
    /// store refuses its fenced writes, and the refusal then tells it.
    #[tokio::test(start_paused = true)]
    async fn switch_lose_lease_unnoticed() -> Result<()> {
        let ha = MemoryHaServices::new();
        let l = ha.campaign(JM, "a:1", &never()).await?;
        assert_eq!(ha.lose_lease_unnoticed(JM), Some(l.epoch));
        assert!(l.check().is_ok(), "the leader was not told");
        let refused = ha.increment(&l, "counters/x").await;
        assert!(matches!(refused, Err(KeelError::LeadershipLost { .. })), "{refused:?}");
        assert!(l.lost().is_cancelled());
        assert_eq!(ha.get("counters/x").await?, None);
        Ok(())
    }

    /// `fail_next_writes(n)`: exactly the next n leader-only writes fail with `Unavailable`
    /// and change nothing; the one after succeeds.
    #[tokio::test(start_paused = true)]
    async fn switch_fail_next_writes() -> Result<()> {
        let ha = MemoryHaServices::new();
        let l = ha.campaign(JM, "a:1", &never()).await?;
        ha.fail_next_writes(2);
        assert!(matches!(ha.put(&l, "k", b"v".to_vec()).await, Err(KeelError::Unavailable { .. })));
        assert!(matches!(ha.increment(&l, "c").await, Err(KeelError::Unavailable { .. })));
        assert_eq!(ha.get("k").await?, None);
        assert_eq!(ha.get("c").await?, None);
        assert!(l.check().is_ok(), "a failed write does not end the leadership");
        ha.put(&l, "k", b"v".to_vec()).await?;
        assert_eq!(ha.increment(&l, "c").await?, 1);
        assert_eq!(ha.get("k").await?, Some(b"v".to_vec()));
        Ok(())
    }

    /// `delay_watches(d)`: a watcher sees a change no earlier than `d` after it happened (on
    /// tokio's clock) and does see it then.
    #[tokio::test(start_paused = true)]
    async fn switch_delay_watches() -> Result<()> {
        let ha = MemoryHaServices::new();
        let mut rx = ha.watch_leader(JM, never());
        ha.delay_watches(Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        let l = ha.campaign(JM, "a:1", &never()).await?;
        rx.changed().await.map_err(|e| KeelError::internal(e.to_string()))?;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(rx.borrow().as_ref().map(|i| i.epoch), Some(l.epoch));
        ha.delay_watches(Duration::ZERO);
        let start = tokio::time::Instant::now();
        ha.lose_lease(JM);
        rx.changed().await.map_err(|e| KeelError::internal(e.to_string()))?;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(*rx.borrow(), None);
        Ok(())
    }

    /// Leaderships read the store's clock.
    #[tokio::test(start_paused = true)]
    async fn leaderships_read_the_store_clock() -> Result<()> {
        let clock = TestClock::new();
        let ha = MemoryHaServices::with_clock(clock.shared());
        let l = ha.campaign(JM, "a:1", &never()).await?;
        clock.advance(Duration::from_secs(3600));
        assert_eq!(l.clock().lease_now(), clock.lease_now());
        assert_eq!(l.clock().now_ms(), TestClock::WALL_START_MS + 3_600_000);
        Ok(())
    }
}
