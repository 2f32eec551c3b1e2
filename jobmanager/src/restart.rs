//! Restart strategies: what a job does after a failure. Pure decision logic, no I/O.
//!
//! The strategy itself ([`keel_config::RestartConfig`]) comes from the cluster's
//! `restart-strategy.*` keys, overridden by the job spec's `config:`. What it has counted so far
//! ([`RestartState`]) is kept in the job record in the HA store, so a new JobManager leader
//! continues counting where the old one stopped. Times are wall-clock milliseconds for the same
//! reason. The semantics are Flink's (`RestartBackoffTimeStrategy` and its implementations):
//!
//! - `none`: the first failure fails the job.
//! - `fixed-delay`: `attempts` restarts over the job's life, each after `delay`; the failure
//!   after the last allowed restart fails the job.
//! - `exponential-delay`: the n-th restart since the last reset waits
//!   `initial-backoff * backoff-multiplier^(n-1)`, moved at random by up to `jitter-factor` of
//!   itself, and kept within `[initial-backoff, max-backoff]`. A failure that comes
//!   `reset-backoff-threshold` or more after the previous restart resets the backoff and the
//!   count. More than `attempts-before-reset-backoff` restarts without a reset fail the job.
//! - `failure-rate`: each restart after `delay`; a failure that makes more than
//!   `max-failures-per-interval` failures within `failure-rate-interval` fails the job.
//!
//! The jitter comes from a [`SplitMix64`] the caller passes in, so tests choose the seed.

use std::time::Duration;

use keel_config::{RestartConfig, RestartStrategyType};
use keel_proto::pb;
use keel_proto::{KeelError, Result};
use keel_spec::JobSpec;
use serde::{Deserialize, Serialize};

use crate::record::JobRecord;

/// How many restarts the job record keeps in its history (the newest ones); `restarts` in the
/// record counts all of them.
pub const HISTORY_LIMIT: usize = 20;

/// What a strategy has counted so far. Serialized into the job record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartState {
    /// Every failure handled by the strategy over the job's life (`fixed-delay` counts these).
    #[serde(default)]
    pub failures: u32,
    /// `exponential-delay`: restarts since the backoff was last reset.
    #[serde(default)]
    pub backoff_restarts: u32,
    /// `exponential-delay`: when the previous restart was due (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_at_ms: Option<u64>,
    /// `failure-rate`: the failures still inside the interval (ms since the epoch, oldest
    /// first; at most `max-failures-per-interval + 1`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_failures_ms: Vec<u64>,
}

/// The strategy's answer to a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this pause.
    Restart { delay: Duration },
    /// Do not restart: the job fails. `why` says which limit was reached.
    Fail { why: String },
}

/// One restart, as the job record and `keel status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartEntry {
    /// When the failure was handled (ms since the epoch).
    pub at_ms: u64,
    /// The attempt that failed (the `#n` of its task ids).
    pub attempt: u32,
    /// The number of this restart over the job's life (1 for the first).
    pub restart: u32,
    /// Why the attempt failed.
    pub cause: String,
    /// The pause the strategy chose before the next attempt.
    pub delay_ms: u64,
}

/// The failure that ended a job: the strategy would not restart it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureEntry {
    pub at_ms: u64,
    pub attempt: u32,
    /// Why the attempt failed.
    pub cause: String,
    /// Why it was not restarted (which limit of the strategy was reached).
    pub why: String,
}

/// Everything about restarts that the job record keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    #[serde(default)]
    pub state: RestartState,
    /// The newest restarts, oldest first, at most [`HISTORY_LIMIT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RestartEntry>,
    /// Set when the strategy gave up and the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureEntry>,
}

impl RestartEntry {
    pub fn to_pb(&self) -> pb::RestartEvent {
        pb::RestartEvent {
            time_ms: self.at_ms,
            attempt: self.attempt,
            restart: self.restart,
            cause: self.cause.clone(),
            delay_ms: self.delay_ms,
        }
    }
}

impl FailureEntry {
    pub fn to_pb(&self) -> pb::JobFailure {
        pb::JobFailure {
            time_ms: self.at_ms,
            attempt: self.attempt,
            cause: self.cause.clone(),
            reason: self.why.clone(),
        }
    }
}

/// A job's restart strategy: the cluster's `restart-strategy.*` keys, overridden by the spec's
/// `config:`. The error names the offending key as `config.<key>`.
pub fn for_spec(cluster: &RestartConfig, spec: &JobSpec) -> Result<RestartConfig> {
    cluster
        .with_overrides(&spec.config)
        .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))
}

/// The restart strategy of a job's active version, described for `keel status`; empty when
/// the spec cannot be read.
pub fn describe_for(cluster: &RestartConfig, record: &JobRecord) -> String {
    record
        .active()
        .and_then(|v| JobSpec::parse(&v.spec_yaml).ok())
        .and_then(|spec| for_spec(cluster, &spec).ok())
        .map(|c| c.describe())
        .unwrap_or_default()
}

impl RestartRecord {
    /// Adds a restart to the history, dropping the oldest beyond [`HISTORY_LIMIT`].
    pub fn push(&mut self, entry: RestartEntry) {
        self.history.push(entry);
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
    }
}

/// A small deterministic random number generator (SplitMix64) for the jitter.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn seeded(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Seeded from a fresh random UUID.
    pub fn from_entropy() -> Self {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        SplitMix64(a ^ b)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[-bound, bound]`, every value about equally likely.
    pub fn offset(&mut self, bound: u64) -> i64 {
        if bound == 0 {
            return 0;
        }
        let bound = bound.min(i64::MAX as u64 / 2);
        let span = 2 * bound + 1;
        (self.next_u64() % span) as i64 - bound as i64
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Decides what to do about a failure at `now_ms`, and counts it in `state`.
pub fn on_failure(
    config: &RestartConfig,
    state: &mut RestartState,
    now_ms: u64,
    rng: &mut SplitMix64,
) -> Decision {
    state.failures = state.failures.saturating_add(1);
    match config.strategy {
        RestartStrategyType::None => {
            Decision::Fail { why: "restart-strategy.type is none: a failed job is not restarted".into() }
        }
        RestartStrategyType::FixedDelay => {
            let f = &config.fixed_delay;
            if state.failures > f.attempts {
                Decision::Fail {
                    why: format!(
                        "fixed-delay restart strategy exhausted: {} restart attempt{} used \
                         (restart-strategy.fixed-delay.attempts)",
                        f.attempts,
                        if f.attempts == 1 { "" } else { "s" }
                    ),
                }
            } else {
                Decision::Restart { delay: f.delay }
            }
        }
        RestartStrategyType::ExponentialDelay => {
            let e = &config.exponential_delay;
            if let Some(last) = state.last_restart_at_ms {
                if now_ms.saturating_sub(last) >= millis(e.reset_backoff_threshold) {
                    state.backoff_restarts = 0;
                }
            }
            let exponent = i32::try_from(state.backoff_restarts).unwrap_or(i32::MAX);
            let initial = millis(e.initial_backoff) as f64;
            let max = millis(e.max_backoff) as f64;
            let backoff = (initial * e.backoff_multiplier.powi(exponent)).min(max);
            let jitter = rng.offset((backoff * e.jitter_factor) as u64) as f64;
            let delay_ms = (backoff + jitter).clamp(initial, max) as u64;
            state.backoff_restarts = state.backoff_restarts.saturating_add(1);
            state.last_restart_at_ms = Some(now_ms.saturating_add(delay_ms));
            match e.attempts_before_reset_backoff {
                Some(limit) if state.backoff_restarts > limit => Decision::Fail {
                    why: format!(
                        "exponential-delay restart strategy exhausted: {limit} restart{} without a \
                         reset of the backoff (restart-strategy.exponential-delay.attempts-before-reset-backoff)",
                        if limit == 1 { "" } else { "s" }
                    ),
                },
                _ => Decision::Restart { delay: Duration::from_millis(delay_ms) },
            }
        }
        RestartStrategyType::FailureRate => {
            let f = &config.failure_rate;
            let interval = millis(f.interval);
            state.recent_failures_ms.retain(|t| now_ms.saturating_sub(*t) <= interval);
            state.recent_failures_ms.push(now_ms);
            let max = f.max_failures_per_interval as usize;
            if state.recent_failures_ms.len() > max + 1 {
                let excess = state.recent_failures_ms.len() - (max + 1);
                state.recent_failures_ms.drain(..excess);
            }
            if state.recent_failures_ms.len() > max {
                Decision::Fail {
                    why: format!(
                        "failure-rate restart strategy exhausted: {} failures within {} \
                         (restart-strategy.failure-rate.max-failures-per-interval is {max})",
                        state.recent_failures_ms.len(),
                        keel_config::format_duration(f.interval)
                    ),
                }
            } else {
                Decision::Restart { delay: f.delay }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: &str, keys: &[(&str, &str)]) -> RestartConfig {
        let mut c = RestartConfig::builtin();
        c.set("restart-strategy.type", strategy).expect("type");
        for (k, v) in keys {
            c.set(k, v).expect("key");
        }
        c.validate().expect("valid");
        c
    }

    /// Feeds failures at the given times and returns each decision.
    fn run(c: &RestartConfig, times_ms: &[u64], seed: u64) -> (Vec<Decision>, RestartState) {
        let mut state = RestartState::default();
        let mut rng = SplitMix64::seeded(seed);
        let decisions = times_ms.iter().map(|t| on_failure(c, &mut state, *t, &mut rng)).collect();
        (decisions, state)
    }

    fn restart_ms(d: &Decision) -> Option<u64> {
        match d {
            Decision::Restart { delay } => Some(delay.as_millis() as u64),
            Decision::Fail { .. } => None,
        }
    }

    #[test]
    fn none_fails_at_the_first_failure() {
        let (d, _) = run(&config("none", &[]), &[0], 1);
        assert!(matches!(&d[0], Decision::Fail { why } if why.contains("none")), "{d:?}");
    }

    /// `attempts: 2`: two restarts, the third failure (of the third attempt) fails the job.
    #[test]
    fn fixed_delay_allows_exactly_its_attempts() {
        let c = config(
            "fixed-delay",
            &[
                ("restart-strategy.fixed-delay.attempts", "2"),
                ("restart-strategy.fixed-delay.delay", "250 ms"),
            ],
        );
        let (d, state) = run(&c, &[0, 10_000, 10_000_000], 1);
        assert_eq!(restart_ms(&d[0]), Some(250));
        assert_eq!(restart_ms(&d[1]), Some(250));
        assert!(matches!(&d[2], Decision::Fail { why } if why.contains("2 restart attempts")), "{d:?}");
        assert_eq!(state.failures, 3);
        // Zero attempts: like none.
        let c = config("fixed-delay", &[("restart-strategy.fixed-delay.attempts", "0")]);
        assert!(matches!(run(&c, &[0], 1).0[0], Decision::Fail { .. }));
    }

    /// Without jitter the pauses are initial * multiplier^n, capped at max-backoff.
    #[test]
    fn exponential_delay_grows_and_is_capped() {
        let c = config(
            "exponential-delay",
            &[
                ("restart-strategy.exponential-delay.initial-backoff", "100 ms"),
                ("restart-strategy.exponential-delay.max-backoff", "1 s"),
                ("restart-strategy.exponential-delay.backoff-multiplier", "2"),
                ("restart-strategy.exponential-delay.jitter-factor", "0"),
            ],
        );
        // Failures 10 ms apart: far below the reset threshold.
        let times: Vec<u64> = (0..6).map(|i| i * 10).collect();
        let (d, state) = run(&c, &times, 1);
        let delays: Vec<Option<u64>> = d.iter().map(restart_ms).collect();
        assert_eq!(delays, vec![Some(100), Some(200), Some(400), Some(800), Some(1000), Some(1000)]);
        assert_eq!(state.backoff_restarts, 6);
    }

    /// Flink's defaults: 1 s, 1.5 s, 2.25 s, ... up to 1 min, each within +-10 % and never below
    /// the initial backoff; the same seed gives the same pauses.
    #[test]
    fn exponential_delay_jitter_stays_within_its_factor_and_is_seeded() {
        let c = RestartConfig::builtin();
        let times: Vec<u64> = (0..15).map(|i| i * 1000).collect();
        let (a, _) = run(&c, &times, 42);
        let (b, _) = run(&c, &times, 42);
        assert_eq!(a, b, "the same seed gives the same pauses");
        let (other, _) = run(&c, &times, 7);
        assert_ne!(a, other, "another seed moves them");
        for (n, d) in a.iter().enumerate() {
            let ms = restart_ms(d).expect("unlimited restarts") as f64;
            let base = (1000.0 * 1.5f64.powi(n as i32)).min(60_000.0);
            assert!((1000.0..=60_000.0).contains(&ms), "restart {n}: {ms}");
            assert!((ms - base).abs() <= base * 0.1 + 1.0, "restart {n}: {ms} vs {base}");
        }
        assert_eq!(restart_ms(&a[14]).map(|ms| ms >= 54_000), Some(true), "capped near max-backoff");
    }

    /// A failure reset-backoff-threshold after the previous restart starts from the initial
    /// backoff again, and resets the attempt count too.
    #[test]
    fn exponential_delay_resets_after_a_quiet_period() {
        let c = config(
            "exponential-delay",
            &[
                ("restart-strategy.exponential-delay.initial-backoff", "100 ms"),
                ("restart-strategy.exponential-delay.backoff-multiplier", "2"),
                ("restart-strategy.exponential-delay.jitter-factor", "0"),
                ("restart-strategy.exponential-delay.reset-backoff-threshold", "10 s"),
                ("restart-strategy.exponential-delay.attempts-before-reset-backoff", "3"),
            ],
        );
        // Three quick failures, then one 10 s after the third restart was due (300 + 400 ms).
        let (d, state) = run(&c, &[0, 200, 500, 10_900], 1);
        let delays: Vec<Option<u64>> = d.iter().map(restart_ms).collect();
        assert_eq!(delays, vec![Some(100), Some(200), Some(400), Some(100)]);
        assert_eq!(state.backoff_restarts, 1);
        // Four quick failures exceed attempts-before-reset-backoff = 3.
        let (d, _) = run(&c, &[0, 200, 500, 1000], 1);
        assert!(
            matches!(&d[3], Decision::Fail { why } if why.contains("attempts-before-reset-backoff")),
            "{d:?}"
        );
    }

    /// `max-failures-per-interval: 3`: three failures within the interval restart, the fourth
    /// fails the job; failures spread wider than the interval restart forever.
    #[test]
    fn failure_rate_counts_failures_within_the_interval() {
        let c = config(
            "failure-rate",
            &[
                ("restart-strategy.failure-rate.max-failures-per-interval", "3"),
                ("restart-strategy.failure-rate.failure-rate-interval", "10 s"),
                ("restart-strategy.failure-rate.delay", "50 ms"),
            ],
        );
        let (d, _) = run(&c, &[0, 1000, 2000, 3000], 1);
        let delays: Vec<Option<u64>> = d.iter().map(restart_ms).collect();
        assert_eq!(delays[..3], [Some(50), Some(50), Some(50)]);
        assert!(matches!(&d[3], Decision::Fail { why } if why.contains("4 failures within 10 s")), "{d:?}");
        let spread: Vec<u64> = (0..20).map(|i| i * 4000).collect();
        let (d, state) = run(&c, &spread, 1);
        assert!(d.iter().all(|d| restart_ms(d) == Some(50)), "{d:?}");
        assert!(state.recent_failures_ms.len() <= 4);
        // Flink's default of 1 per minute: a second failure within the minute fails the job.
        let c = config("failure-rate", &[]);
        let (d, _) = run(&c, &[0, 70_000, 80_000], 1);
        assert_eq!((restart_ms(&d[0]), restart_ms(&d[1])), (Some(1000), Some(1000)));
        assert!(matches!(d[2], Decision::Fail { .. }));
    }

    /// The state survives the trip through the job record (a new leader keeps counting).
    #[test]
    fn state_round_trips_and_old_records_read_as_empty() {
        let c = config("fixed-delay", &[("restart-strategy.fixed-delay.attempts", "2")]);
        let (_, state) = run(&c, &[0, 1], 1);
        let json = serde_json::to_string(&state).expect("encode");
        let mut back: RestartState = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, state);
        let d = on_failure(&c, &mut back, 2, &mut SplitMix64::seeded(1));
        assert!(matches!(d, Decision::Fail { .. }), "the third failure fails after a leader change");
        let empty: RestartRecord = serde_json::from_str("{}").expect("decode");
        assert_eq!(empty, RestartRecord::default());
    }

    #[test]
    fn history_keeps_the_newest_entries() {
        let mut r = RestartRecord::default();
        for n in 1..=25u32 {
            r.push(RestartEntry {
                at_ms: n as u64,
                attempt: n,
                restart: n,
                cause: format!("c{n}"),
                delay_ms: 1,
            });
        }
        assert_eq!(r.history.len(), HISTORY_LIMIT);
        assert_eq!(r.history.first().map(|e| e.restart), Some(6));
        assert_eq!(r.history.last().map(|e| e.restart), Some(25));
    }

    #[test]
    fn offsets_stay_within_their_bound() {
        let mut rng = SplitMix64::seeded(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let o = rng.offset(2);
            assert!((-2..=2).contains(&o));
            seen.insert(o);
        }
        assert_eq!(seen.len(), 5, "every value in the range shows up");
        assert_eq!(rng.offset(0), 0);
    }
}
