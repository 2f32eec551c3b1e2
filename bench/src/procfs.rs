//! What /proc says about a process: resident memory and CPU time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident size so far.
    pub hwm_kib: u64,
}

/// `VmRSS` and `VmHWM` from `/proc/<pid>/status`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("{path} has no {name}"))
    };
    Ok(Memory { rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")? })
}

/// Resets the process's peak resident size (`VmHWM`) to its present size, by writing `5` to
/// `/proc/<pid>/clear_refs` (Linux 4.0 and later; the process's owner may): the next
/// [`memory`] then shows the peak since this call.
pub fn reset_peak(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3, the state, first).
fn stat_fields(pid: &str) -> anyhow::Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let after = text.rfind(')').map(|i| &text[i + 1..]).ok_or_else(|| anyhow!("{path}: no command name"))?;
    Ok(after.split_whitespace().map(str::to_string).collect())
}

/// User plus system CPU time of a process (all its threads) so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let fields = stat_fields(&pid.to_string())?;
    // utime and stime are fields 14 and 15; the state (field 3) is index 0 here.
    let tick = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: no field {}", i + 3))
    };
    Ok((tick(11)? + tick(12)?) / ticks_per_second())
}

/// Samples a process's `VmRSS` every 100 ms on a thread of its own and keeps the largest.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PeakSampler {
    pub fn start(pid: u32) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kib.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(m) = memory(pid) {
                    p.fetch_max(m.rss_kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        PeakSampler { stop, peak_kib, thread: Some(thread) }
    }

    /// Stops sampling; the largest `VmRSS` seen, in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kib.load(Ordering::Relaxed)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One sample of [`UsageSampler`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// When it was taken (ms since the epoch).
    pub at_ms: i64,
    /// CPU seconds of all the sampled processes together (a process that died keeps what it
    /// had used when last seen).
    pub cpu_s: f64,
}

/// Samples the CPU time of a set of processes every 100 ms on a thread of its own, and the
/// largest `VmRSS` any one of them had.
pub struct UsageSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    samples: Arc<std::sync::Mutex<Vec<Usage>>>,
    thread: Option<JoinHandle<()>>,
}

impl UsageSampler {
    pub fn start(pids: Vec<u32>) -> UsageSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, p, v) = (stop.clone(), peak_kib.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let mut last = vec![0.0f64; pids.len()];
            loop {
                for (i, pid) in pids.iter().enumerate() {
                    if let Ok(cpu) = cpu_seconds(*pid) {
                        last[i] = cpu;
                    }
                    if let Ok(m) = memory(*pid) {
                        p.fetch_max(m.rss_kib, Ordering::Relaxed);
                    }
                }
                let sample = Usage { at_ms: crate::kafka::now_ms(), cpu_s: last.iter().sum() };
                if let Ok(mut all) = v.lock() {
                    all.push(sample);
                }
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        UsageSampler { stop, peak_kib, samples, thread: Some(thread) }
    }

    /// Stops sampling (after one last sample); returns the samples and the peak RSS in KiB.
    pub fn finish(mut self) -> (Vec<Usage>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        (samples, self.peak_kib.load(Ordering::Relaxed))
    }
}

impl Drop for UsageSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// CPU seconds used between `from_ms` and `to_ms`: the last sample at or before `to_ms` minus
/// the last one at or before `from_ms` (the first sample when none is that early).
pub fn cpu_between(samples: &[Usage], from_ms: i64, to_ms: i64) -> Option<f64> {
    let at = |t: i64| samples.iter().rev().find(|s| s.at_ms <= t).or(samples.first());
    let (a, b) = (at(from_ms)?, at(to_ms)?);
    Some((b.cpu_s - a.cpu_s).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_between_takes_the_samples_around_the_window() {
        let s = |at_ms, cpu_s| Usage { at_ms, cpu_s };
        let samples = [s(1000, 1.0), s(1100, 1.5), s(1200, 2.5), s(1300, 2.6)];
        assert_eq!(cpu_between(&samples, 1100, 1250), Some(1.0));
        assert_eq!(cpu_between(&samples, 0, 5000), Some(1.6));
        assert_eq!(cpu_between(&[], 0, 1), None);
    }

    /// After a reset the peak is the present size again, not the larger one before it.
    #[test]
    fn the_peak_can_be_reset() -> anyhow::Result<()> {
        let me = std::process::id();
        let big = vec![1u8; 64 << 20];
        let with_big = memory(me)?.hwm_kib;
        drop(std::hint::black_box(big));
        reset_peak(me)?;
        let after = memory(me)?;
        assert!(
            after.hwm_kib < with_big,
            "VmHWM {} KiB after the reset, {with_big} KiB before",
            after.hwm_kib
        );
        Ok(())
    }

    #[test]
    fn this_process_is_measured() -> anyhow::Result<()> {
        let me = std::process::id();
        assert!(memory(me)?.rss_kib > 0);
        assert!(cpu_seconds(me)? >= 0.0);
        let (samples, peak) = UsageSampler::start(vec![me]).finish();
        assert!(!samples.is_empty() && peak > 0);
        Ok(())
    }
}
