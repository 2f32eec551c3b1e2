//! The [`Registry`] of labelled metrics and the handles it hands out.
//!
//! Handles are cheap clones of atomics: updating a metric takes no lock. The registry's lock is
//! taken only to register, unregister, render and look up. A series (a name with one set of
//! label values) is reference-counted: two groups registering the same series share it, and it
//! disappears when the last of them is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::names::{self, Kind};

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, stored as `f64` bits.
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// Sets an integer value (offsets, counts); exact up to 2^53.
    pub fn set_i64(&self, v: i64) {
        self.set(v as f64);
    }

    pub fn add(&self, delta: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + delta).to_bits())
        });
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Milliseconds since the latest [`ElapsedGauge::mark`] (or since creation), computed when read:
/// `sourceIdleTime` stays right while nothing happens and nobody updates it.
#[derive(Debug, Clone)]
pub struct ElapsedGauge {
    base: Instant,
    /// Milliseconds from `base` to the latest mark.
    mark_ms: Arc<AtomicU64>,
}

impl Default for ElapsedGauge {
    fn default() -> Self {
        ElapsedGauge { base: Instant::now(), mark_ms: Arc::new(AtomicU64::new(0)) }
    }
}

impl ElapsedGauge {
    /// Restarts the clock now.
    pub fn mark(&self) {
        self.mark_at(Instant::now());
    }

    pub fn mark_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.base).as_millis();
        self.mark_ms.store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        self.get_at(Instant::now())
    }

    pub fn get_at(&self, now: Instant) -> f64 {
        let now_ms = u64::try_from(now.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(self.mark_ms.load(Ordering::Relaxed)) as f64
    }
}

/// The window a [`Meter`] averages over by default (Flink's `MeterView` uses 60 s).
pub const DEFAULT_METER_WINDOW: Duration = Duration::from_secs(60);
/// Samples closer together than this replace each other.
const METER_RESOLUTION: Duration = Duration::from_secs(1);

/// A per-second rate of a [`Counter`], computed when read (see the crate docs).
#[derive(Debug, Clone)]
pub struct Meter {
    counter: Counter,
    window: Duration,
    samples: Arc<Mutex<VecDeque<(Instant, u64)>>>,
}

impl Meter {
    /// A meter of `counter` over `window`, starting now.
    pub fn new(counter: &Counter, window: Duration) -> Meter {
        Meter::starting_at(counter, window, Instant::now())
    }

    /// A meter whose first sample is taken at `start` (for deterministic tests).
    pub fn starting_at(counter: &Counter, window: Duration, start: Instant) -> Meter {
        let mut samples = VecDeque::new();
        samples.push_back((start, counter.get()));
        Meter { counter: counter.clone(), window, samples: Arc::new(Mutex::new(samples)) }
    }

    /// The counter this meter watches.
    pub fn counter(&self) -> &Counter {
        &self.counter
    }

    /// Events per second over the window, as of now.
    pub fn rate(&self) -> f64 {
        self.rate_at(Instant::now())
    }

    /// Events per second over the window, as of `now` (records a sample at `now`).
    pub fn rate_at(&self, now: Instant) -> f64 {
        let count = self.counter.get();
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let newest = samples.back().map(|(t, _)| *t);
        match newest {
            // Reads closer together than the resolution update the newest sample, keeping the
            // oldest (the anchor) in place.
            Some(t) if samples.len() >= 2 && now.saturating_duration_since(t) < METER_RESOLUTION => {
                if let Some(last) = samples.back_mut() {
                    *last = (now.max(t), count);
                }
            }
            Some(t) if now < t => {}
            _ => samples.push_back((now, count)),
        }
        // Keep exactly one sample at or before the start of the window.
        if let Some(start) = now.checked_sub(self.window) {
            while samples.len() > 2 && samples.get(1).is_some_and(|(t, _)| *t <= start) {
                samples.pop_front();
            }
        }
        match (samples.front(), samples.back()) {
            (Some((t0, c0)), Some((t1, c1))) => {
                let dt = t1.saturating_duration_since(*t0).as_secs_f64();
                if dt <= 0.0 {
                    0.0
                } else {
                    c1.saturating_sub(*c0) as f64 / dt
                }
            }
            _ => 0.0,
        }
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Elapsed(ElapsedGauge),
    Meter(Meter),
}

impl Metric {
    fn kind(&self) -> Kind {
        match self {
            Metric::Counter(_) => Kind::Counter,
            _ => Kind::Gauge,
        }
    }

    fn value(&self) -> f64 {
        match self {
            Metric::Counter(c) => c.get() as f64,
            Metric::Gauge(g) => g.get(),
            Metric::Elapsed(e) => e.get(),
            Metric::Meter(m) => m.rate(),
        }
    }

    fn same_variant(&self, other: &Metric) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Label pairs, sorted by name, names unique.
pub(crate) type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Series {
    metric: Metric,
    refs: usize,
}

#[derive(Debug)]
pub(crate) struct Family {
    /// The name it was first registered under (`numRecordsIn`).
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) help: String,
    series: BTreeMap<Labels, Series>,
}

/// All metrics of a process.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// By Prometheus base name (`keel_num_records_in`, without `_total`).
    families: Arc<RwLock<BTreeMap<String, Family>>>,
}

/// One metric value, as [`Registry::snapshot`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// `numRecordsIn` → `keel_num_records_in`: snake_case, anything but `[a-z0-9_]` → `_`.
pub(crate) fn base_name(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::from("keel_");
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev = i.checked_sub(1).and_then(|p| chars.get(p));
            let next = chars.get(i + 1);
            let boundary = prev.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit())
                || (prev.is_some_and(char::is_ascii_uppercase) && next.is_some_and(char::is_ascii_lowercase));
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out
}

/// A label name made valid: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn label_name(name: &str) -> String {
    let mut out: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Sorted, sanitised labels; a later pair overrides an earlier one with the same name.
pub(crate) fn normalize(labels: impl IntoIterator<Item = (String, String)>) -> Labels {
    let mut map = BTreeMap::new();
    for (k, v) in labels {
        map.insert(label_name(&k), v);
    }
    map.into_iter().collect()
}

fn borrowed<'a>(labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (String, String)> + 'a {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// A group of metrics sharing `labels` (`[("job", "orders"), ("subtask", "0")]`). Every
    /// metric registered through it is unregistered when it is dropped.
    pub fn group(&self, labels: &[(&str, &str)]) -> MetricGroup {
        MetricGroup {
            registry: self.clone(),
            labels: normalize(borrowed(labels)),
            owned: Mutex::new(Vec::new()),
        }
    }

    /// Registers (or joins) a series; returns the shared metric, or `candidate` itself, not
    /// exported, when `name` is already registered as another type.
    fn register(&self, name: &str, labels: &Labels, candidate: Metric) -> (Metric, bool) {
        let key = base_name(name);
        let mut families = self.families.write().unwrap_or_else(PoisonError::into_inner);
        let family = families.entry(key.clone()).or_insert_with(|| Family {
            name: name.to_string(),
            kind: candidate.kind(),
            help: names::help(name).map_or_else(|| format!("Keel metric {name}."), str::to_string),
            series: BTreeMap::new(),
        });
        if family.kind != candidate.kind() {
            tracing::warn!(metric = %name, prometheus = %key, "metric already registered with another type; not exported");
            return (candidate, false);
        }
        match family.series.get_mut(labels) {
            Some(series) if series.metric.same_variant(&candidate) => {
                series.refs += 1;
                (series.metric.clone(), true)
            }
            Some(_) => {
                tracing::warn!(metric = %name, "metric already registered with another type; not exported");
                (candidate, false)
            }
            None => {
                family.series.insert(labels.clone(), Series { metric: candidate.clone(), refs: 1 });
                (candidate, true)
            }
        }
    }

    fn unregister(&self, name: &str, labels: &Labels) {
        let key = base_name(name);
        let mut families = self.families.write().unwrap_or_else(PoisonError::into_inner);
        let Some(family) = families.get_mut(&key) else { return };
        if let Some(series) = family.series.get_mut(labels) {
            series.refs = series.refs.saturating_sub(1);
            if series.refs == 0 {
                family.series.remove(labels);
            }
        }
        if family.series.is_empty() {
            families.remove(&key);
        }
    }

    /// The current value of the series `name` with exactly `labels` (in any order). Counters
    /// are returned as `f64`; a meter's rate is computed now.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = normalize(borrowed(labels));
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        families.get(&base_name(name))?.series.get(&labels).map(|s| s.metric.value())
    }

    /// The sum over every series of `name` whose labels include `labels` (all partitions of a
    /// task, all subtasks of a job); `None` when no series matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted = normalize(borrowed(labels));
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        let family = families.get(&base_name(name))?;
        let mut matched = false;
        let mut total = 0.0;
        for (l, s) in &family.series {
            if wanted.iter().all(|w| l.contains(w)) {
                matched = true;
                total += s.metric.value();
            }
        }
        matched.then_some(total)
    }

    /// Every series with its current value, ordered by Prometheus name and labels.
    pub fn snapshot(&self) -> Vec<Sample> {
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        families
            .values()
            .flat_map(|f| {
                f.series.iter().map(|(labels, s)| Sample {
                    name: f.name.clone(),
                    labels: labels.clone(),
                    value: s.metric.value(),
                })
            })
            .collect()
    }

    /// Visits every family (by Prometheus base name) with its series values, under the read lock.
    pub(crate) fn visit(&self, mut f: impl FnMut(&str, &Family, &mut dyn Iterator<Item = (&Labels, f64)>)) {
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        for (key, family) in families.iter() {
            let mut it = family.series.iter().map(|(l, s)| (l, s.metric.value()));
            f(key, family, &mut it);
        }
    }
}

/// A set of labels and the metrics registered under them; dropping it unregisters them.
#[derive(Debug)]
pub struct MetricGroup {
    registry: Registry,
    labels: Labels,
    owned: Mutex<Vec<String>>,
}

impl MetricGroup {
    /// The group's labels, sorted by name.
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A group with this group's labels plus `extra` (a per-partition group). It has its own
    /// lifetime: dropping it unregisters only what was registered through it.
    pub fn group(&self, extra: &[(&str, &str)]) -> MetricGroup {
        let labels = normalize(self.labels.iter().cloned().chain(borrowed(extra)));
        MetricGroup { registry: self.registry.clone(), labels, owned: Mutex::new(Vec::new()) }
    }

    fn add(&self, name: &str, candidate: Metric) -> Metric {
        let (metric, registered) = self.registry.register(name, &self.labels, candidate);
        if registered {
            self.owned.lock().unwrap_or_else(PoisonError::into_inner).push(name.to_string());
        }
        metric
    }

    pub fn counter(&self, name: &str) -> Counter {
        match self.add(name, Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        match self.add(name, Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    pub fn elapsed(&self, name: &str) -> ElapsedGauge {
        match self.add(name, Metric::Elapsed(ElapsedGauge::default())) {
            Metric::Elapsed(e) => e,
            _ => ElapsedGauge::default(),
        }
    }

    /// A meter of `counter` over [`DEFAULT_METER_WINDOW`].
    pub fn meter(&self, name: &str, counter: &Counter) -> Meter {
        self.meter_with_window(name, counter, DEFAULT_METER_WINDOW)
    }

    pub fn meter_with_window(&self, name: &str, counter: &Counter, window: Duration) -> Meter {
        let fresh = Meter::new(counter, window);
        match self.add(name, Metric::Meter(fresh.clone())) {
            Metric::Meter(m) => m,
            _ => fresh,
        }
    }
}

impl Drop for MetricGroup {
    fn drop(&mut self) {
        let owned = std::mem::take(self.owned.get_mut().unwrap_or_else(PoisonError::into_inner));
        for name in owned {
            self.registry.unregister(&name, &self.labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flink_names_become_snake_case_prometheus_names() {
        for (flink, prom) in [
            ("numRecordsIn", "keel_num_records_in"),
            ("numRecordsInPerSecond", "keel_num_records_in_per_second"),
            ("currentEmitEventTimeLag", "keel_current_emit_event_time_lag"),
            ("HTTPRequests", "keel_http_requests"),
            ("records-consumed-total", "keel_records_consumed_total"),
            ("p99Latency", "keel_p99_latency"),
            ("with space.and.dots", "keel_with_space_and_dots"),
        ] {
            assert_eq!(base_name(flink), prom);
        }
    }

    #[test]
    fn a_series_lives_while_any_group_holding_it_lives() {
        let r = Registry::new();
        let a = r.group(&[("task", "t1"), ("job", "j")]);
        let b = r.group(&[("job", "j"), ("task", "t1")]);
        let ca = a.counter(names::NUM_RECORDS_IN);
        let cb = b.counter(names::NUM_RECORDS_IN);
        ca.add(2);
        cb.inc();
        assert_eq!(r.get("numRecordsIn", &[("job", "j"), ("task", "t1")]), Some(3.0));
        drop(a);
        assert_eq!(r.get("numRecordsIn", &[("task", "t1"), ("job", "j")]), Some(3.0));
        drop(b);
        assert_eq!(r.get("numRecordsIn", &[("task", "t1"), ("job", "j")]), None);
        assert!(r.snapshot().is_empty());
    }

    #[test]
    fn dropping_a_child_group_removes_only_its_metrics() {
        let r = Registry::new();
        let task = r.group(&[("task", "t")]);
        let records = task.counter(names::NUM_RECORDS_IN);
        let p0 = task.group(&[("topic", "orders"), ("partition", "0")]);
        p0.gauge(names::CURRENT_OFFSET).set_i64(42);
        assert_eq!(
            r.get("currentOffset", &[("task", "t"), ("topic", "orders"), ("partition", "0")]),
            Some(42.0)
        );
        drop(p0);
        assert_eq!(r.get("currentOffset", &[("task", "t"), ("topic", "orders"), ("partition", "0")]), None);
        records.inc();
        assert_eq!(r.get("numRecordsIn", &[("task", "t")]), Some(1.0));
    }

    #[test]
    fn a_name_registered_as_another_kind_gets_a_working_detached_handle() {
        let r = Registry::new();
        let g = r.group(&[]);
        g.counter("thing").add(5);
        let gauge = g.gauge("thing");
        gauge.set(1.5);
        assert_eq!(gauge.get(), 1.5);
        assert_eq!(r.get("thing", &[]), Some(5.0));
        drop(g);
        assert_eq!(r.get("thing", &[]), None);
    }

    #[test]
    fn sum_adds_every_series_that_has_the_given_labels() {
        let r = Registry::new();
        let t = r.group(&[("job", "j"), ("subtask", "0")]);
        let p0 = t.group(&[("partition", "0")]);
        let p1 = t.group(&[("partition", "1")]);
        p0.gauge(names::PENDING_RECORDS).set(3.0);
        p1.gauge(names::PENDING_RECORDS).set(4.0);
        assert_eq!(r.sum(names::PENDING_RECORDS, &[("job", "j")]), Some(7.0));
        assert_eq!(r.sum(names::PENDING_RECORDS, &[("partition", "1")]), Some(4.0));
        assert_eq!(r.sum(names::PENDING_RECORDS, &[("job", "other")]), None);
        assert_eq!(r.sum("nothing", &[]), None);
    }

    #[test]
    fn gauges_hold_floats_and_add_atomically() {
        let g = Gauge::default();
        g.set(-2.5);
        g.add(1.0);
        assert_eq!(g.get(), -1.5);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| g.add(1.0)))
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(g.get(), 3998.5);
    }

    #[test]
    fn a_meter_reports_the_rate_over_its_window() {
        let c = Counter::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let m = Meter::starting_at(&c, s(60), t0);
        assert_eq!(m.rate_at(t0), 0.0);
        c.add(100);
        assert_eq!(m.rate_at(t0 + s(10)), 10.0);
        // Reads within a second update the newest sample instead of piling up.
        c.add(5);
        assert_eq!(m.rate_at(t0 + Duration::from_millis(10_500)), 105.0 / 10.5);
        // Steady 10/s for two minutes: the window slides, the rate stays 10.
        let mut now = t0 + s(10);
        for _ in 0..120 {
            now += s(1);
            c.add(10);
            m.rate_at(now);
        }
        // The counter stops: after the window the rate falls to zero.
        let r = m.rate_at(now + s(30));
        assert!((r - 5.0).abs() < 0.5, "{r}");
        assert_eq!(m.rate_at(now + s(61)), 0.0);
        let len = m.samples.lock().expect("lock").len();
        assert!(len <= 63, "{len} samples kept");
    }

    #[test]
    fn a_meter_read_rarely_averages_over_what_it_has() {
        let c = Counter::default();
        let t0 = Instant::now();
        let m = Meter::starting_at(&c, Duration::from_secs(60), t0);
        c.add(300);
        assert_eq!(m.rate_at(t0 + Duration::from_secs(15)), 20.0);
        c.add(300);
        assert_eq!(m.rate_at(t0 + Duration::from_secs(30)), 20.0);
        c.add(1200);
        // Scraped every 15 s: the anchor moves once a sample falls out of the window.
        assert_eq!(m.rate_at(t0 + Duration::from_secs(90)), 1500.0 / 75.0);
    }

    #[test]
    fn elapsed_gauge_counts_from_the_latest_mark() {
        let e = ElapsedGauge::default();
        let t = e.base + Duration::from_millis(1500);
        assert_eq!(e.get_at(t), 1500.0);
        e.mark_at(t);
        assert_eq!(e.get_at(t + Duration::from_millis(250)), 250.0);
        assert_eq!(e.get_at(t - Duration::from_millis(1)), 0.0);
    }
}
