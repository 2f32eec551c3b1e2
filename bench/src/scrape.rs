//! A TaskManager's task counters, scraped from its `GET /metrics` (Prometheus text) on a thread
//! of its own every few milliseconds while a job runs: when a job's first record left its
//! source and when its sinks had written the last one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::anyhow;

use crate::kafka::now_ms;
use crate::procfs;

/// One scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When the answer came (ms since the epoch).
    pub at_ms: i64,
    /// Whether the job had any series (its task runs).
    pub present: bool,
    /// `keel_num_records_in_total` summed over the job's series (rows its sources handed on).
    pub records_in: u64,
    /// `keel_num_records_out_total` summed over the job's series (rows its sinks wrote).
    pub records_out: u64,
    /// CPU seconds of the TaskManager process so far (from /proc, read right after the scrape).
    pub cpu_s: Option<f64>,
}

/// The sum of the counter `name` over the series whose labels include `job="<job>"`.
pub fn counter_sum(text: &str, name: &str, job: &str) -> Option<u64> {
    let label = format!("job=\"{job}\"");
    let prefix = format!("{name}{{");
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let Some(close) = rest.rfind('}') else { continue };
        if !rest[..close].split(',').any(|l| l == label) {
            continue;
        }
        let value = rest[close + 1..].trim().parse::<f64>().ok()?;
        *found.get_or_insert(0) += value as u64;
    }
    found
}

/// Scrapes `address` (`host:port` of a TaskManager's metrics endpoint) every `every` for the
/// counters of `job`, and reads the CPU time of process `pid` with each scrape.
pub struct Scraper {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl Scraper {
    pub fn start(address: &str, job: &str, pid: u32, every: Duration) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let url = format!("http://{address}/metrics");
        let job = job.to_string();
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(text) = agent.get(&url).call().and_then(|mut r| r.body_mut().read_to_string()) {
                    let records_in = counter_sum(&text, "keel_num_records_in_total", &job);
                    let records_out = counter_sum(&text, "keel_num_records_out_total", &job);
                    let sample = Sample {
                        at_ms: now_ms(),
                        present: records_in.is_some() || records_out.is_some(),
                        records_in: records_in.unwrap_or_default(),
                        records_out: records_out.unwrap_or_default(),
                        cpu_s: procfs::cpu_seconds(pid).ok(),
                    };
                    if let Ok(mut all) = v.lock() {
                        all.push(sample);
                    }
                }
                std::thread::sleep(every);
            }
        });
        Scraper { stop, samples, thread: Some(thread) }
    }

    /// Stops scraping; returns the samples in the order taken.
    pub fn finish(mut self) -> anyhow::Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow!("the scraper thread panicked"))?;
        }
        let samples = self.samples.lock().map_err(|_| anyhow!("scraper samples poisoned"))?;
        Ok(samples.clone())
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the samples say about a job that passes `records` rows from its source and writes
/// `written` of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// When the first row left the source: the first sample with a row in, moved back by the
    /// rows it already showed at the rate of the span (but not before the sample before it).
    pub first_ms: f64,
    /// When the last row was written: the first sample with every row written (`complete`);
    /// else (the task ended and its series vanished between two samples) the last sample with
    /// the series, moved on by the rows still to write at the rate of the span (but not past the
    /// first sample without them).
    pub last_ms: f64,
    /// Whether a sample showed all `written` rows written.
    pub complete: bool,
    /// The TaskManager's CPU seconds between the first sample with a row in and the end sample
    /// (`complete`: the one with every row written; else the first without the series).
    pub cpu_s: Option<f64>,
    /// The largest counts seen.
    pub max_in: u64,
    pub max_out: u64,
}

impl Span {
    pub fn secs(&self) -> f64 {
        (self.last_ms - self.first_ms).max(1.0) / 1000.0
    }
}

/// The running span of a job in `samples` (see [`Span`]): from the first row out of its source
/// to the last of `written` rows written by its sinks. `None` when no sample saw a row.
pub fn span(samples: &[Sample], written: u64) -> Option<Span> {
    let start = samples.iter().position(|s| s.present && s.records_in > 0)?;
    let first = samples.get(start)?;
    let before = start.checked_sub(1).and_then(|i| samples.get(i)).map(|s| s.at_ms).unwrap_or(first.at_ms);
    let rest = samples.get(start..)?;
    let done = rest.iter().position(|s| s.present && s.records_out >= written);
    // The last sample with the series, and the end sample.
    let (last_present, end, complete) = match done {
        Some(i) => (rest.get(i)?, rest.get(i)?, true),
        None => {
            let gone = rest.iter().position(|s| !s.present);
            let last = match gone {
                Some(g) => rest.get(g.checked_sub(1)?)?,
                None => rest.last()?,
            };
            (last, gone.and_then(|g| rest.get(g)).unwrap_or(last), false)
        }
    };
    // Rows written per ms between the first sample and the last one with the series.
    let elapsed = (last_present.at_ms - first.at_ms) as f64;
    let rate_out = (elapsed > 0.0)
        .then(|| last_present.records_out.saturating_sub(first.records_out) as f64 / elapsed)
        .filter(|r| *r > 0.0);
    let rate_in = (elapsed > 0.0)
        .then(|| last_present.records_in.saturating_sub(first.records_in) as f64 / elapsed)
        .filter(|r| *r > 0.0);
    let first_ms = match rate_in {
        Some(r) => (first.at_ms as f64 - first.records_in as f64 / r).max(before as f64),
        None => first.at_ms as f64,
    };
    let last_ms = if complete {
        end.at_ms as f64
    } else {
        match rate_out {
            Some(r) => (last_present.at_ms as f64
                + written.saturating_sub(last_present.records_out) as f64 / r)
                .min(end.at_ms as f64),
            None => end.at_ms as f64,
        }
    };
    let cpu_s = match (first.cpu_s, end.cpu_s) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    Some(Span {
        first_ms,
        last_ms,
        complete,
        cpu_s,
        max_in: rest.iter().map(|s| s.records_in).max().unwrap_or_default(),
        max_out: rest.iter().map(|s| s.records_out).max().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE keel_num_records_in_total counter
keel_num_records_in_total{job="dg",job_id="a",source="gen",subtask="0",task_id="a/v1/0#1",version="1"} 2048
keel_num_records_in_total{job="dg",job_id="a",source="gen",subtask="1",task_id="a/v1/1#1",version="1"} 1024
keel_num_records_in_total{job="dg-fp",job_id="b",source="gen",subtask="0",task_id="b/v1/0#1",version="1"} 7
keel_num_records_out_total{job="dg",job_id="a",sink="out",subtask="0",task_id="a/v1/0#1",version="1"} 1000
keel_num_records_in_per_second{job="dg",job_id="a",source="gen",subtask="0",task_id="a/v1/0#1",version="1"} 5.5
"#;

    /// Counters are summed over the job's own series only: another job's (whose name shares a
    /// prefix) and other metrics with the same prefix do not count.
    #[test]
    fn counters_are_summed_over_the_jobs_series() {
        assert_eq!(counter_sum(TEXT, "keel_num_records_in_total", "dg"), Some(3072));
        assert_eq!(counter_sum(TEXT, "keel_num_records_in_total", "dg-fp"), Some(7));
        assert_eq!(counter_sum(TEXT, "keel_num_records_out_total", "dg"), Some(1000));
        assert_eq!(counter_sum(TEXT, "keel_num_records_out_total", "dg-fp"), None);
        assert_eq!(counter_sum(TEXT, "keel_num_records_in_total", "other"), None);
    }

    fn s(at_ms: i64, present: bool, records_in: u64, records_out: u64, cpu: f64) -> Sample {
        Sample { at_ms, present, records_in, records_out, cpu_s: Some(cpu) }
    }

    /// The span runs from the first row in to the last row out: a sample that already shows
    /// rows is moved back by them at the span's rate (not before the sample before it); a job
    /// whose series vanished before a sample showed every row written ends where the rows left
    /// to write would have been written at that rate (not after the first sample without the
    /// series), and is marked incomplete. The CPU is the difference between the end samples.
    #[test]
    fn the_span_is_first_row_in_to_last_row_out() -> anyhow::Result<()> {
        let samples = [
            s(0, false, 0, 0, 1.0),
            s(10, true, 0, 0, 1.1),
            s(20, true, 50, 40, 1.2),
            s(30, true, 150, 140, 1.3),
            s(40, true, 250, 200, 1.4),
            s(50, false, 0, 0, 1.5),
        ];
        // 10 rows in per ms from 20 to 40 ms: the 50 rows at 20 ms began at 15 ms.
        let full = span(&samples, 200).ok_or_else(|| anyhow!("no span"))?;
        assert_eq!((full.first_ms, full.last_ms, full.complete), (15.0, 40.0, true));
        assert!((full.cpu_s.unwrap_or_default() - 0.2).abs() < 1e-9);
        assert_eq!((full.max_in, full.max_out), (250, 200));
        // 230 to write, 200 seen at 40 ms, 8 rows out per ms: 43.75 ms.
        let cut = span(&samples, 230).ok_or_else(|| anyhow!("no span"))?;
        assert_eq!((cut.last_ms, cut.complete), (43.75, false));
        // Far more to write than the rate allows before the series vanished: at most 50 ms.
        let far = span(&samples, 10_000).ok_or_else(|| anyhow!("no span"))?;
        assert_eq!(far.last_ms, 50.0);
        assert!(span(&samples[..2], 1).is_none());
        Ok(())
    }
}
