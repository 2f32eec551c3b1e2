//! What a won election hands to the leader, and the local-clock rule that bounds it.
//!
//! A [`Leadership`] held through a lease (etcd) is valid only until a *deadline* on this
//! process's own clock: the send time of the last keep-alive etcd answered, plus the lease TTL,
//! minus a safety margin ([`lease_deadline`]). etcd counts a lease from when it *receives* a
//! keep-alive, so it cannot expire the lease, and no one else can win the election, before
//! that deadline. Past it, this process cannot know whether it still leads, so it must behave
//! as if it does not: [`Leadership::check`] and [`Leadership::is_valid`] compare the deadline
//! with the clock themselves, without waiting for the keep-alive task to notice. A process that
//! was stopped (SIGSTOP), descheduled or suspended past its lease therefore refuses its first
//! leader action after it resumes, even if its keep-alive task has not run yet.
//!
//! The clock is [`LeaseInstant`]: `CLOCK_BOOTTIME` on Linux. Like `CLOCK_MONOTONIC` it is never
//! set back and keeps counting while the process is stopped; unlike it, it also counts while
//! the machine is suspended, so a leader on a host that slept past its lease does not resume
//! believing it still leads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_proto::{KeelError, Result};
use tokio_util::sync::CancellationToken;

use crate::clock::{self, Clock};
use crate::Role;

/// A reading of the clock lease deadlines are measured with (see the module documentation):
/// time since boot, including time suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseInstant(Duration);

impl LeaseInstant {
    /// The current reading of the lease clock.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn now() -> LeaseInstant {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        // The kernel never returns negative or out-of-range values for CLOCK_BOOTTIME.
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let nanos = u32::try_from(t.tv_nsec).unwrap_or(0).min(999_999_999);
        LeaseInstant(Duration::new(secs, nanos))
    }

    /// The current reading of the lease clock (elsewhere: the monotonic clock since the first
    /// reading in this process).
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub fn now() -> LeaseInstant {
        use std::sync::OnceLock;
        use std::time::Instant;
        static BASE: OnceLock<Instant> = OnceLock::new();
        LeaseInstant(BASE.get_or_init(Instant::now).elapsed() + Duration::from_secs(1))
    }

    /// The reading `d` after the clock's origin (for test clocks; see [`crate::clock`]).
    pub fn from_duration(d: Duration) -> LeaseInstant {
        LeaseInstant(d)
    }

    /// The reading as a duration since the clock's origin (boot, on Linux): readings taken by
    /// different processes on one host compare.
    pub fn as_duration(self) -> Duration {
        self.0
    }

    /// How much later than `earlier` this is; zero when it is not later.
    pub fn saturating_duration_since(self, earlier: LeaseInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// The time since this reading; zero when it is in the future.
    pub fn elapsed(self) -> Duration {
        LeaseInstant::now().saturating_duration_since(self)
    }

    fn as_nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX - 1).min(u64::MAX - 1)
    }

    fn from_nanos(nanos: u64) -> LeaseInstant {
        LeaseInstant(Duration::from_nanos(nanos))
    }
}

impl std::ops::Add<Duration> for LeaseInstant {
    type Output = LeaseInstant;

    fn add(self, d: Duration) -> LeaseInstant {
        LeaseInstant(self.0.saturating_add(d))
    }
}

impl std::ops::Sub<Duration> for LeaseInstant {
    type Output = LeaseInstant;

    fn sub(self, d: Duration) -> LeaseInstant {
        LeaseInstant(self.0.saturating_sub(d))
    }
}

/// How much earlier than the earliest possible expiry of its lease a leader stops acting: a
/// tenth of the TTL, at most half a second. It covers the time between a leader's last
/// [`Leadership::check`] and the moment its action takes effect elsewhere (an RPC in flight, a
/// file being written), and any difference in the rate of this host's clock and etcd's. (A
/// successor needs longer than that anyway: etcd expires leases on a 500 ms sweep, then the
/// standby must see the key deleted, win its own transaction and recover the HA store; and
/// what a deposed leader's RPC asks of a process that already saw its successor's epoch is
/// refused there.)
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 10).min(Duration::from_millis(500))
}

/// The deadline of a leadership whose last keep-alive (or lease grant) answered by etcd was
/// sent at `sent`, for a lease of `ttl`: `sent + ttl - safety_margin(ttl)`.
pub fn lease_deadline(sent: LeaseInstant, ttl: Duration) -> LeaseInstant {
    sent + ttl.saturating_sub(safety_margin(ttl))
}

/// Stored in place of a deadline by leaderships that have none.
const NO_DEADLINE: u64 = u64::MAX;

/// Held by a leader. The token in [`Leadership::lost`] is cancelled as soon as leadership is
/// known to be gone (lease expired, key deleted, keep-alives failing, shutdown), and by
/// [`Leadership::check`] / [`Leadership::is_valid`] themselves once the lease deadline has
/// passed; see the module documentation for the deadline. The deadline is compared with the
/// [`Clock`] the leadership was made with ([`clock::system`] unless [`Leadership::on_clock`]).
#[derive(Debug, Clone)]
pub struct Leadership {
    pub role: Role,
    pub epoch: u64,
    pub address: String,
    lost: CancellationToken,
    /// The deadline on the lease clock, in nanoseconds; [`NO_DEADLINE`] for backends whose
    /// leadership lasts as long as the process (local lock files).
    deadline_ns: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
}

impl Leadership {
    /// A leadership with no lease deadline (it lasts until `lost` is cancelled).
    pub fn new(role: Role, epoch: u64, address: String, lost: CancellationToken) -> Self {
        Leadership {
            role,
            epoch,
            address,
            lost,
            deadline_ns: Arc::new(AtomicU64::new(NO_DEADLINE)),
            clock: clock::system(),
        }
    }

    /// The same leadership, its deadline read on `clock` from now on (the backends pass the
    /// clock they measure keep-alives with; tests pass a [`crate::clock::TestClock`]).
    pub fn on_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The clock this leadership's deadline is read on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// A leadership held through a lease, valid until `deadline` unless extended with
    /// [`Leadership::extend_until`].
    pub fn with_deadline(
        role: Role,
        epoch: u64,
        address: String,
        lost: CancellationToken,
        deadline: LeaseInstant,
    ) -> Self {
        let l = Leadership::new(role, epoch, address, lost);
        l.deadline_ns.store(deadline.as_nanos(), Ordering::SeqCst);
        l
    }

    /// Moves the deadline to `deadline` if that is later (it is never shortened).
    pub fn extend_until(&self, deadline: LeaseInstant) {
        self.deadline_ns.fetch_max(deadline.as_nanos(), Ordering::SeqCst);
    }

    /// The lease deadline, if this leadership has one.
    pub fn deadline(&self) -> Option<LeaseInstant> {
        match self.deadline_ns.load(Ordering::SeqCst) {
            NO_DEADLINE => None,
            ns => Some(LeaseInstant::from_nanos(ns)),
        }
    }

    /// How long the leadership stays valid without a renewal: `None` without a deadline, zero
    /// once it has passed or the leadership was lost.
    pub fn remaining(&self) -> Option<Duration> {
        if self.lost.is_cancelled() {
            return Some(Duration::ZERO);
        }
        self.deadline().map(|d| d.saturating_duration_since(self.clock.lease_now()))
    }

    /// The token cancelled when leadership is lost. Leader work runs under it.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Marks leadership as lost (used by backends and on shutdown).
    pub fn give_up(&self) {
        self.lost.cancel();
    }

    /// How long ago the deadline passed, if it has.
    fn overdue(&self) -> Option<Duration> {
        let deadline = self.deadline()?;
        let now = self.clock.lease_now();
        (now >= deadline).then(|| now.saturating_duration_since(deadline))
    }

    /// True while this process may act as leader. Once the deadline has passed this is false,
    /// and the [`Leadership::lost`] token is cancelled on the spot, so leader work waiting on it
    /// stops too.
    pub fn is_valid(&self) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        match self.overdue() {
            None => true,
            Some(overdue) => {
                self.expire(overdue);
                false
            }
        }
    }

    fn expire(&self, overdue: Duration) {
        if !self.lost.is_cancelled() {
            tracing::warn!(
                role = %self.role,
                epoch = self.epoch,
                overdue_ms = u64::try_from(overdue.as_millis()).unwrap_or(u64::MAX),
                "lease deadline passed without a renewed keep-alive; acting as a standby"
            );
            self.lost.cancel();
        }
    }

    /// `Ok` while leadership is held, a typed `LeadershipLost` error otherwise. Call it right
    /// before any action that only a leader may take: it compares the lease deadline with the
    /// clock itself, so it is right even when no other task has run since a pause.
    pub fn check(&self) -> Result<()> {
        if self.lost.is_cancelled() {
            return Err(KeelError::LeadershipLost {
                reason: format!("{} leadership of epoch {} is no longer held", self.role, self.epoch),
            });
        }
        match self.overdue() {
            None => Ok(()),
            Some(overdue) => {
                self.expire(overdue);
                Err(KeelError::LeadershipLost {
                    reason: format!(
                        "{} leadership of epoch {}: its lease deadline passed {} ms ago without a renewed keep-alive",
                        self.role,
                        self.epoch,
                        overdue.as_millis()
                    ),
                })
            }
        }
    }

    pub fn info(&self) -> crate::LeaderInfo {
        crate::LeaderInfo { address: self.address.clone(), epoch: self.epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;

    /// A leadership valid for `valid_for` on a manual test clock, and the clock.
    fn lease(valid_for: Duration) -> (Leadership, TestClock) {
        let clock = TestClock::new();
        let l = Leadership::with_deadline(
            Role::JobManager,
            7,
            "a:1".into(),
            CancellationToken::new(),
            clock.lease_now() + valid_for,
        )
        .on_clock(clock.shared());
        (l, clock)
    }

    /// The margin is a tenth of the TTL, capped at half a second, and the deadline is the send
    /// time of the answered keep-alive plus the TTL minus that margin.
    #[test]
    fn deadline_is_send_time_plus_ttl_minus_margin() {
        assert_eq!(safety_margin(Duration::from_secs(2)), Duration::from_millis(200));
        assert_eq!(safety_margin(Duration::from_secs(3)), Duration::from_millis(300));
        assert_eq!(safety_margin(Duration::from_secs(30)), Duration::from_millis(500));
        let sent = TestClock::new().lease_now();
        let deadline = lease_deadline(sent, Duration::from_secs(3));
        assert_eq!(deadline.saturating_duration_since(sent), Duration::from_millis(2700));
    }

    /// A leadership without a deadline (local lock files) is valid until given up.
    #[test]
    fn without_deadline_valid_until_given_up() {
        let l = Leadership::new(Role::ResourceManager, 1, "a:1".into(), CancellationToken::new());
        assert!(l.is_valid());
        assert!(l.check().is_ok());
        assert_eq!(l.remaining(), None);
        l.give_up();
        assert!(!l.is_valid());
        assert!(matches!(l.check(), Err(KeelError::LeadershipLost { .. })));
        assert_eq!(l.remaining(), Some(Duration::ZERO));
    }

    /// Extending never shortens the deadline: a late answer to an older keep-alive cannot
    /// take validity away that a newer one granted, and the clones share the deadline.
    #[test]
    fn extend_never_shortens_and_is_shared_by_clones() {
        let (l, clock) = lease(Duration::from_secs(10));
        let clone = l.clone();
        let far = l.deadline().expect("deadline");
        l.extend_until(clock.lease_now() + Duration::from_secs(1));
        assert_eq!(l.deadline(), Some(far));
        l.extend_until(far + Duration::from_secs(5));
        assert_eq!(clone.deadline(), Some(far + Duration::from_secs(5)));
        assert_eq!(clone.remaining(), Some(Duration::from_secs(15)));
    }

    /// A leadership is valid up to the last instant before its deadline and refused at the
    /// deadline itself; `remaining()` counts down on the leadership's clock.
    #[test]
    fn valid_until_the_deadline_and_not_at_it() {
        let (l, clock) = lease(Duration::from_millis(20));
        clock.advance(Duration::from_millis(19));
        assert_eq!(l.remaining(), Some(Duration::from_millis(1)));
        assert!(l.check().is_ok(), "valid 1 ms before the deadline");
        clock.advance(Duration::from_millis(1));
        assert!(l.check().is_err(), "refused at the deadline");
        assert_eq!(l.remaining(), Some(Duration::ZERO));
    }

    /// The pause rule: a leader whose whole runtime was blocked past its deadline (as a
    /// SIGSTOPped process is: no task, no keep-alive task either, runs) is refused by its very
    /// first `check()` afterwards, although nothing cancelled its token in the meantime; the
    /// check cancels the token, so leader work waiting on it stops as well. The clock jumps
    /// past the deadline while the test holds the only runtime thread, so no task runs between
    /// the jump and the check.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn blocked_past_the_deadline_first_check_refuses_and_cancels() {
        let (l, clock) = lease(Duration::from_millis(100));
        let watcher = tokio::spawn({
            let token = l.lost().clone();
            async move { token.cancelled().await }
        });
        assert!(l.check().is_ok(), "valid before the deadline");
        clock.advance(Duration::from_millis(250));
        assert!(!l.lost().is_cancelled(), "nothing could have noticed yet");
        let err = l.check().expect_err("the first check after the pause must refuse");
        match &err {
            KeelError::LeadershipLost { reason } => {
                assert!(reason.contains("deadline passed 150 ms ago"), "{reason}")
            }
            other => panic!("expected LeadershipLost, got {other:?}"),
        }
        assert!(l.lost().is_cancelled(), "check() cancels the token");
        // Under paused time the timeout fires at once (auto-advance) if the watcher never wakes.
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("leader work waiting on the token wakes up")
            .expect("join");
        assert!(!l.is_valid());
        // Extending after the loss does not revive it.
        l.extend_until(clock.lease_now() + Duration::from_secs(10));
        assert!(l.check().is_err());
    }

    /// `is_valid()` applies the same rule as `check()` and also cancels the token.
    #[test]
    fn is_valid_past_the_deadline_cancels_the_token() {
        let (l, clock) = lease(Duration::from_millis(20));
        assert!(l.is_valid());
        clock.advance(Duration::from_millis(60));
        assert!(!l.is_valid());
        assert!(l.lost().is_cancelled());
        assert_eq!(l.remaining(), Some(Duration::ZERO));
    }

    /// A leadership read on a clock that follows paused tokio time expires when tokio time
    /// passes its deadline, as the keep-alive task's timers see it.
    #[tokio::test(start_paused = true)]
    async fn deadline_follows_paused_tokio_time() {
        let clock = TestClock::tokio();
        let l = Leadership::with_deadline(
            Role::JobManager,
            3,
            "a:1".into(),
            CancellationToken::new(),
            lease_deadline(clock.lease_now(), Duration::from_secs(3)),
        )
        .on_clock(clock.shared());
        tokio::time::sleep(Duration::from_millis(2699)).await;
        assert!(l.check().is_ok());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(l.check().is_err());
    }

    /// The lease clock never goes back and runs at least as fast as the monotonic clock
    /// (`std::time::Instant`): an interval read inside another is not longer than it.
    #[test]
    fn lease_clock_is_monotonic_and_counts_real_time() {
        let a = LeaseInstant::now();
        let inner_start = std::time::Instant::now();
        let mut spins = 0u64;
        while std::time::Instant::now() == inner_start {
            spins = spins.wrapping_add(1);
            std::hint::black_box(spins);
        }
        let inner = inner_start.elapsed();
        let b = LeaseInstant::now();
        assert!(b > a);
        assert!(b.saturating_duration_since(a) >= inner, "{:?} < {inner:?}", b.saturating_duration_since(a));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert!(a.elapsed() >= b.saturating_duration_since(a));
    }
}
