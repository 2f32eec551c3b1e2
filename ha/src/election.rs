//! The decisions of the etcd backend's campaign and keep-alive, without I/O.
//!
//! [`crate::etcd`] carries out what these functions decide: it sends the requests, waits, and
//! reports what came back; here is only *what to do next* given that, the lease TTL and the
//! clock, so each rule has a unit test.
//!
//! - Campaign ([`Campaign`]): a step that won returns the leadership; a step that found the
//!   leader key taken (or lost the race to create it) watches the key until it goes; an
//!   unreachable etcd is retried after a growing pause ([`Backoff`]); any other error ends the
//!   campaign. A vacancy seen (or a quiet re-check) tries again at once; an interrupted watch
//!   pauses first.
//! - Keep-alive ([`KeepAlive`]): before each keep-alive, a leadership whose deadline passed is
//!   given up; an answer with a TTL extends the deadline to `sent + min(TTL, asked TTL) -
//!   margin` and idles until the next keep-alive is due; an answer of TTL 0 or "lease not found"
//!   gives the leadership up; a failed, ended or unanswered stream is reopened after
//!   [`KEEP_ALIVE_RETRY`].
//! - Leader-key watch ([`leader_key_change`]): the key deleted, or re-created at another
//!   revision than the leadership's epoch, ends the leadership.
//! - Deadline watch ([`deadline_check`]): when to look again, or that the deadline passed.

use std::time::Duration;

use crate::{lease_deadline, LeaseInstant};

/// Retry pauses after an etcd error: the first.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Retry pauses after an etcd error: the longest.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause before re-opening a keep-alive stream that failed.
pub(crate) const KEEP_ALIVE_RETRY: Duration = Duration::from_millis(100);

/// Pauses that double from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`].
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }

    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// How often a leader sends a keep-alive: every tenth of the TTL (at least every 50 ms). After
/// an answered keep-alive the leadership holds for `TTL - margin` (see [`lease_deadline`]), so
/// when etcd stops answering (a member died, the raft leader is being replaced) a leader has at
/// least `TTL - margin - interval` to get a keep-alive through again: 2.4 s with the default
/// TTL of 3 s. Losing etcd's raft leader leaves etcd unable to answer for one to two election
/// timeouts plus a vote (1 s each by default: about 1.2 to 2.2 s measured here), so the TTL
/// must stay well above twice etcd's election timeout.
pub fn keep_alive_interval(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(50))
}

/// The lease TTL to ask etcd for, in whole seconds (etcd's unit), rounded up, at least 1.
pub(crate) fn ttl_secs(lease_ttl: Duration) -> i64 {
    i64::try_from(lease_ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1)
}

/// The TTL a new leadership's deadline is computed with: never longer than what was asked for
/// or what etcd granted. `None` when etcd granted no time at all.
pub(crate) fn granted_ttl(asked: Duration, granted_secs: i64) -> Option<Duration> {
    let granted = Duration::from_secs(u64::try_from(granted_secs).unwrap_or(0));
    (!granted.is_zero()).then(|| granted.min(asked))
}

/// What came of one campaign step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepOutcome {
    /// The leader key was created with this process's lease.
    Won,
    /// Somebody else leads (or won the race); the key existed at `revision`.
    Taken { revision: i64 },
    /// etcd could not be reached or could not serve the step.
    Unavailable,
    /// Any other error: the campaign ends with it.
    Failed,
}

/// What the campaign does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CampaignAction {
    /// Return the leadership won.
    Lead,
    /// Watch the leader key from `revision + 1` until it is deleted.
    WatchForVacancy { revision: i64 },
    /// Run another step at once.
    TryNow,
    /// Run another step after this pause.
    RetryAfter(Duration),
    /// Return the step's error.
    Fail,
}

/// The campaign's state between steps: the pause after errors.
#[derive(Debug)]
pub(crate) struct Campaign {
    backoff: Backoff,
}

impl Campaign {
    pub(crate) fn new() -> Self {
        Campaign { backoff: Backoff::new() }
    }

    /// After a step.
    pub(crate) fn after_step(&mut self, outcome: StepOutcome) -> CampaignAction {
        match outcome {
            StepOutcome::Won => CampaignAction::Lead,
            StepOutcome::Taken { revision } => CampaignAction::WatchForVacancy { revision },
            StepOutcome::Unavailable => CampaignAction::RetryAfter(self.backoff.next()),
            StepOutcome::Failed => CampaignAction::Fail,
        }
    }

    /// After watching for a vacancy: `seen` when the key was deleted or the quiet re-check
    /// came, false when the watch was interrupted.
    pub(crate) fn after_wait(&mut self, seen: bool) -> CampaignAction {
        if seen {
            self.backoff.reset();
            CampaignAction::TryNow
        } else {
            CampaignAction::RetryAfter(self.backoff.next())
        }
    }
}

/// What came of opening the keep-alive stream or of one keep-alive on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeepAliveOutcome {
    /// The stream opened (its opening keep-alive was answered).
    Opened,
    /// etcd answered the keep-alive with the lease's remaining TTL, in seconds.
    Answered { ttl_secs: i64 },
    /// etcd does not know the lease.
    LeaseNotFound,
    /// The stream failed, ended or gave no answer within the interval.
    Broken,
}

/// Whether the keep-alive task sends the next keep-alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BeforeSend {
    /// Send it (opening the stream first if there is none).
    Send,
    /// Give the leadership up, for this reason.
    GiveUp { reason: String },
}

/// What the keep-alive task does after a keep-alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeepAliveAction {
    /// Move the leadership's deadline to `deadline`, then idle until the next keep-alive is due,
    /// `next_in` from now (reopening at once if the stream breaks meanwhile).
    Extend { deadline: LeaseInstant, next_in: Duration },
    /// Drop the stream and open a new one after this pause.
    Reopen { after: Duration },
    /// Give the leadership up, for this reason.
    GiveUp { reason: String },
}

/// The keep-alive rules of one leadership's lease.
#[derive(Debug, Clone)]
pub(crate) struct KeepAlive {
    lease: i64,
    /// The TTL the deadline is computed with (see [`granted_ttl`]).
    ttl: Duration,
}

impl KeepAlive {
    pub(crate) fn new(lease: i64, ttl: Duration) -> Self {
        KeepAlive { lease, ttl }
    }

    pub(crate) fn interval(&self) -> Duration {
        keep_alive_interval(self.ttl)
    }

    /// Before a keep-alive is sent at `now`: give up once the leadership's `deadline` passed
    /// (or it was lost), else send.
    pub(crate) fn before_send(
        &self,
        lost: bool,
        deadline: Option<LeaseInstant>,
        now: LeaseInstant,
    ) -> BeforeSend {
        if lost || deadline.is_some_and(|d| now >= d) {
            return BeforeSend::GiveUp {
                reason: "the lease deadline passed without a successful keep-alive".into(),
            };
        }
        BeforeSend::Send
    }

    /// After the keep-alive sent at `sent` came to `outcome`.
    pub(crate) fn after(&self, sent: LeaseInstant, outcome: &KeepAliveOutcome) -> KeepAliveAction {
        match *outcome {
            KeepAliveOutcome::Opened => {
                KeepAliveAction::Extend { deadline: lease_deadline(sent, self.ttl), next_in: self.interval() }
            }
            KeepAliveOutcome::Answered { ttl_secs } if ttl_secs <= 0 => KeepAliveAction::GiveUp {
                reason: format!("lease {:x} expired (keep-alive answered TTL {ttl_secs})", self.lease),
            },
            KeepAliveOutcome::Answered { ttl_secs } => {
                let ttl = Duration::from_secs(ttl_secs.unsigned_abs()).min(self.ttl);
                KeepAliveAction::Extend { deadline: lease_deadline(sent, ttl), next_in: self.interval() }
            }
            KeepAliveOutcome::LeaseNotFound => {
                KeepAliveAction::GiveUp { reason: format!("lease {:x} is gone", self.lease) }
            }
            KeepAliveOutcome::Broken => KeepAliveAction::Reopen { after: KEEP_ALIVE_RETRY },
        }
    }
}

/// What the deadline watch does with the time a leadership has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadlineCheck {
    /// No deadline: nothing to watch.
    Never,
    /// The deadline passed: the leadership is lost.
    Passed,
    /// Look again after this long (the deadline may have moved by then).
    LookAgainIn(Duration),
}

/// The deadline watch's rule, given [`crate::Leadership::remaining`].
pub(crate) fn deadline_check(remaining: Option<Duration>) -> DeadlineCheck {
    match remaining {
        None => DeadlineCheck::Never,
        Some(left) if left.is_zero() => DeadlineCheck::Passed,
        Some(left) => DeadlineCheck::LookAgainIn(left + Duration::from_millis(1)),
    }
}

/// Returns once `leadership`'s deadline has passed unrenewed (never, without a deadline), so
/// that leader work waiting on its `lost` token stops at the deadline even while a keep-alive
/// is stuck on an unanswered request; what to do is decided by [`deadline_check`]. (Used by
/// the etcd and raft keep-alive tasks; `Leadership::check` does not depend on it.)
pub(crate) async fn watch_deadline(leadership: &crate::Leadership) -> String {
    loop {
        match deadline_check(leadership.remaining()) {
            DeadlineCheck::Never => return std::future::pending().await,
            DeadlineCheck::Passed => {
                return "the lease deadline passed without a successful keep-alive".into()
            }
            // The deadline may move while we sleep; look again when the old one is due.
            DeadlineCheck::LookAgainIn(pause) => tokio::time::sleep(pause).await,
        }
    }
}

/// The leader key as a read or a watch event shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaderKey {
    /// Absent when read.
    Gone,
    /// Deleted (a watch event).
    Deleted,
    /// Present (or written), with this create revision.
    Present { create_revision: i64 },
}

/// Why the leadership of `epoch` ended, if the leader key `key` as seen in `seen` ends it: the
/// key is gone, or was re-created by another leadership.
pub(crate) fn leader_key_change(key: &str, epoch: i64, seen: LeaderKey) -> Option<String> {
    match seen {
        LeaderKey::Gone => Some(format!("leader key {key} is gone")),
        LeaderKey::Deleted => Some(format!("leader key {key} was deleted")),
        LeaderKey::Present { create_revision } if create_revision != epoch => {
            Some(format!("leader key {key} was re-created at revision {create_revision}"))
        }
        LeaderKey::Present { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, TestClock};

    /// Pauses double from 200 ms up to 1 s, and a reset starts them over.
    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let pauses: Vec<u128> = (0..5).map(|_| b.next().as_millis()).collect();
        assert_eq!(pauses, vec![200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }

    /// Keep-alives go every tenth of the TTL, at least every 50 ms; the TTL asked of etcd is
    /// rounded up to whole seconds; the deadline's TTL is the shorter of asked and granted, and
    /// a grant of no time is refused.
    #[test]
    fn intervals_and_ttls() {
        assert_eq!(keep_alive_interval(Duration::from_secs(3)), Duration::from_millis(300));
        assert_eq!(keep_alive_interval(Duration::from_millis(200)), Duration::from_millis(50));
        assert_eq!(ttl_secs(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_secs(Duration::from_secs(3)), 3);
        assert_eq!(ttl_secs(Duration::from_millis(100)), 1);
        assert_eq!(granted_ttl(Duration::from_millis(2500), 3), Some(Duration::from_millis(2500)));
        assert_eq!(granted_ttl(Duration::from_secs(10), 5), Some(Duration::from_secs(5)));
        assert_eq!(granted_ttl(Duration::from_secs(3), 0), None);
        assert_eq!(granted_ttl(Duration::from_secs(3), -1), None);
    }

    /// Campaign: won -> lead; taken / lost race -> watch from the revision; unreachable ->
    /// retry after a growing pause; other errors -> fail. A vacancy seen tries at once and
    /// resets the pause; an interrupted watch pauses.
    #[test]
    fn campaign_transitions() {
        let mut c = Campaign::new();
        assert_eq!(c.after_step(StepOutcome::Won), CampaignAction::Lead);
        assert_eq!(
            c.after_step(StepOutcome::Taken { revision: 41 }),
            CampaignAction::WatchForVacancy { revision: 41 }
        );
        assert_eq!(c.after_step(StepOutcome::Failed), CampaignAction::Fail);
        assert_eq!(
            c.after_step(StepOutcome::Unavailable),
            CampaignAction::RetryAfter(Duration::from_millis(200))
        );
        assert_eq!(
            c.after_step(StepOutcome::Unavailable),
            CampaignAction::RetryAfter(Duration::from_millis(400))
        );
        assert_eq!(c.after_wait(false), CampaignAction::RetryAfter(Duration::from_millis(800)));
        assert_eq!(c.after_wait(true), CampaignAction::TryNow);
        assert_eq!(
            c.after_step(StepOutcome::Unavailable),
            CampaignAction::RetryAfter(Duration::from_millis(200))
        );
    }

    /// Keep-alive: sends while the deadline is ahead, gives up at it or once lost.
    #[test]
    fn keep_alive_sends_until_the_deadline() {
        let clock = TestClock::new();
        let k = KeepAlive::new(0xab, Duration::from_secs(3));
        let deadline = clock.lease_now() + Duration::from_secs(1);
        assert_eq!(k.before_send(false, Some(deadline), clock.lease_now()), BeforeSend::Send);
        assert_eq!(k.before_send(false, None, clock.lease_now()), BeforeSend::Send);
        let give_up =
            BeforeSend::GiveUp { reason: "the lease deadline passed without a successful keep-alive".into() };
        assert_eq!(k.before_send(true, Some(deadline), clock.lease_now()), give_up);
        clock.advance(Duration::from_millis(999));
        assert_eq!(k.before_send(false, Some(deadline), clock.lease_now()), BeforeSend::Send);
        clock.advance(Duration::from_millis(1));
        assert_eq!(k.before_send(false, Some(deadline), clock.lease_now()), give_up);
    }

    /// Keep-alive answers: an opened stream or an answer extends the deadline from the send
    /// time (with the shorter of the answered and the kept TTL) and idles an interval; TTL 0
    /// and an unknown lease give up; a broken stream reopens after the retry pause.
    #[test]
    fn keep_alive_answers() {
        let clock = TestClock::new();
        let k = KeepAlive::new(0xab, Duration::from_secs(3));
        let sent = clock.lease_now();
        let interval = Duration::from_millis(300);
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::Opened),
            KeepAliveAction::Extend { deadline: sent + Duration::from_millis(2700), next_in: interval }
        );
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::Answered { ttl_secs: 3 }),
            KeepAliveAction::Extend { deadline: sent + Duration::from_millis(2700), next_in: interval }
        );
        // etcd answers the remaining TTL rounded down: a shorter TTL gives a nearer deadline.
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::Answered { ttl_secs: 2 }),
            KeepAliveAction::Extend { deadline: sent + Duration::from_millis(1800), next_in: interval }
        );
        // A longer TTL than asked for does not lengthen the deadline.
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::Answered { ttl_secs: 60 }),
            KeepAliveAction::Extend { deadline: sent + Duration::from_millis(2700), next_in: interval }
        );
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::Answered { ttl_secs: 0 }),
            KeepAliveAction::GiveUp { reason: "lease ab expired (keep-alive answered TTL 0)".into() }
        );
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::LeaseNotFound),
            KeepAliveAction::GiveUp { reason: "lease ab is gone".into() }
        );
        assert_eq!(
            k.after(sent, &KeepAliveOutcome::Broken),
            KeepAliveAction::Reopen { after: KEEP_ALIVE_RETRY }
        );
    }

    /// The deadline watch: nothing without a deadline, lost at zero, else look again just
    /// after the current deadline.
    #[test]
    fn deadline_watch() {
        assert_eq!(deadline_check(None), DeadlineCheck::Never);
        assert_eq!(deadline_check(Some(Duration::ZERO)), DeadlineCheck::Passed);
        assert_eq!(
            deadline_check(Some(Duration::from_millis(500))),
            DeadlineCheck::LookAgainIn(Duration::from_millis(501))
        );
    }

    /// The leader key: gone or re-created by another leadership ends this one; the same
    /// create revision keeps it.
    #[test]
    fn leader_key_changes() {
        assert_eq!(leader_key_change("k", 7, LeaderKey::Gone), Some("leader key k is gone".into()));
        assert_eq!(leader_key_change("k", 7, LeaderKey::Deleted), Some("leader key k was deleted".into()));
        assert_eq!(
            leader_key_change("k", 7, LeaderKey::Present { create_revision: 9 }),
            Some("leader key k was re-created at revision 9".into())
        );
        assert_eq!(leader_key_change("k", 7, LeaderKey::Present { create_revision: 7 }), None);
    }
}
