//! The clock that time-based decisions read, injected so that tests can move it.
//!
//! Decisions that depend on time (is a lease still valid, is a deadline due, when did this
//! happen) read a [`Clock`] instead of the system clock. It gives the two readings they need:
//!
//! - [`Clock::lease_now`]: the *lease clock*, a [`LeaseInstant`]: monotonic and, on Linux,
//!   counting the time the process was stopped or the machine suspended
//!   (see [`crate::leadership`]). Use it for durations and deadlines.
//! - [`Clock::now_ms`]: wall-clock milliseconds since the Unix epoch, for timestamps written to
//!   records or shown to people. It may jump; never measure a duration with it.
//!
//! Production code uses [`SystemClock`] (see [`system`]), which reads the real clocks. Tests use
//! [`TestClock`], whose time moves only when the test moves it:
//!
//! - [`TestClock::new`] moves only through [`TestClock::advance`];
//! - [`TestClock::tokio`] also follows tokio's clock, so in a test run under paused time
//!   (`#[tokio::test(start_paused = true)]`) `tokio::time::advance` (or the automatic advance of
//!   an idle paused runtime while a task sleeps) moves it together with every tokio timer.
//!
//! Both readings of a [`TestClock`] move together: advancing it by `d` adds `d` to the lease
//! clock and `d` (in milliseconds) to the wall clock.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::LeaseInstant;

/// A source of time for the decisions that depend on it. See the module documentation.
pub trait Clock: Send + Sync + Debug {
    /// The current reading of the lease clock: monotonic, never set back.
    fn lease_now(&self) -> LeaseInstant;

    /// Wall-clock milliseconds since the Unix epoch (0 if the system clock is before it).
    fn now_ms(&self) -> u64;
}

/// The real clocks: [`LeaseInstant::now`] and the system time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn lease_now(&self) -> LeaseInstant {
        LeaseInstant::now()
    }

    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// The shared [`SystemClock`], the default everywhere a clock can be injected.
pub fn system() -> Arc<dyn Clock> {
    static SYSTEM: OnceLock<Arc<dyn Clock>> = OnceLock::new();
    SYSTEM.get_or_init(|| Arc::new(SystemClock)).clone()
}

/// A clock for tests: it starts at [`TestClock::LEASE_START`] on the lease clock and
/// [`TestClock::WALL_START_MS`] on the wall clock, and moves only when the test moves it (see
/// the module documentation). Clones share one time.
#[derive(Debug, Clone)]
pub struct TestClock {
    inner: Arc<TestInner>,
}

#[derive(Debug)]
struct TestInner {
    /// Where tokio's clock stood when the clock was made, if it follows it.
    tokio_base: Option<tokio::time::Instant>,
    /// Nanoseconds added by [`TestClock::advance`].
    advanced_ns: AtomicU64,
    wall_start_ms: u64,
}

impl TestClock {
    /// The lease-clock reading of a new test clock (an hour after "boot").
    pub const LEASE_START: Duration = Duration::from_secs(3600);
    /// The wall-clock reading of a new test clock: 2027-01-15T08:00:00Z.
    pub const WALL_START_MS: u64 = 1_800_000_000_000;

    /// A clock that moves only through [`TestClock::advance`].
    pub fn new() -> Self {
        TestClock::make(None)
    }

    /// A clock that follows tokio's clock from now on (and moves through
    /// [`TestClock::advance`] as well). Under paused time it moves only when tokio's does.
    pub fn tokio() -> Self {
        TestClock::make(Some(tokio::time::Instant::now()))
    }

    fn make(tokio_base: Option<tokio::time::Instant>) -> Self {
        TestClock {
            inner: Arc::new(TestInner {
                tokio_base,
                advanced_ns: AtomicU64::new(0),
                wall_start_ms: TestClock::WALL_START_MS,
            }),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update never fails with a closure that always returns Some.
        let _ = self
            .inner
            .advanced_ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_add(ns)));
    }

    /// How far the clock has moved since it was made.
    pub fn elapsed(&self) -> Duration {
        let manual = Duration::from_nanos(self.inner.advanced_ns.load(Ordering::SeqCst));
        let followed = self.inner.tokio_base.map(|base| base.elapsed()).unwrap_or_default();
        manual.saturating_add(followed)
    }

    /// This clock as the shared trait object that constructors take.
    pub fn shared(&self) -> Arc<dyn Clock> {
        Arc::new(self.clone())
    }
}

impl Default for TestClock {
    fn default() -> Self {
        TestClock::new()
    }
}

impl Clock for TestClock {
    fn lease_now(&self) -> LeaseInstant {
        LeaseInstant::from_duration(TestClock::LEASE_START.saturating_add(self.elapsed()))
    }

    fn now_ms(&self) -> u64 {
        let ms = u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.wall_start_ms.saturating_add(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manual test clock stands still until advanced, and both readings move by the advance.
    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = TestClock::new();
        let (lease, wall) = (clock.lease_now(), clock.now_ms());
        assert_eq!(lease.as_duration(), TestClock::LEASE_START);
        assert_eq!(wall, TestClock::WALL_START_MS);
        assert_eq!(clock.lease_now(), lease);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.lease_now().saturating_duration_since(lease), Duration::from_millis(1500));
        assert_eq!(clock.now_ms(), wall + 1500);
        // Clones share the time.
        let other = clock.clone();
        other.advance(Duration::from_secs(1));
        assert_eq!(clock.now_ms(), wall + 2500);
    }

    /// A tokio-following test clock moves with paused tokio time and only with it.
    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TestClock::tokio();
        let start = clock.lease_now();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(clock.lease_now().saturating_duration_since(start), Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(clock.now_ms(), TestClock::WALL_START_MS + 35_000);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.lease_now().saturating_duration_since(start), Duration::from_secs(36));
    }

    /// The system clock's readings agree with the real clocks.
    #[test]
    fn system_clock_reads_the_real_clocks() {
        let clock = system();
        let before = LeaseInstant::now();
        let lease = clock.lease_now();
        assert!(lease >= before);
        // After 2020-01-01 (1_577_836_800_000 ms).
        assert!(clock.now_ms() > 1_577_836_800_000);
    }
}
