//! The numbered workload: a thread produces the numbers 0, 1, 2, ... at a steady rate to the
//! input topic. Number `n` has key `k<n % KEYS>` (two digits) and goes to partition
//! `(n % KEYS) % PARTITIONS`; its value is `k<key>,<n>` (CSV: the job's columns `k`, `n`).
//!
//! The producer is idempotent (acks=all; the broker drops a retried batch it already wrote, and
//! order per partition holds) and waits out broker outages (`message.timeout.ms` 10 min). A
//! number whose delivery still fails is produced again, so the input itself may hold a
//! duplicate; the checker reads the input to know.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

/// Keys of the workload.
pub const KEYS: u64 = 12;
/// Partitions of the input topic (one per subtask).
pub const IN_PARTITIONS: u64 = 3;

pub fn key_of(n: u64) -> u64 {
    n % KEYS
}

pub fn partition_of_key(key: u64) -> u64 {
    key % IN_PARTITIONS
}

pub fn partition_of(n: u64) -> u64 {
    partition_of_key(key_of(n))
}

pub fn value_of(n: u64) -> String {
    format!("k{:02},{n}", key_of(n))
}

/// Parses `k<key>,<n>` into `(key, n)`; `None` for anything else.
pub fn parse_value(value: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (k, n) = text.trim().split_once(',')?;
    let key: u64 = k.strip_prefix('k')?.parse().ok()?;
    let n: u64 = n.trim().parse().ok()?;
    (key_of(n) == key).then_some((key, n))
}

/// Delivery outcomes: numbers to produce again, and per partition the offset after the last
/// acknowledged record (what a reader of the input must reach).
struct Failed(Mutex<VecDeque<u64>>, Arc<Mutex<Vec<i64>>>);

impl ClientContext for Failed {}

impl ProducerContext for Failed {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, n: Box<u64>) {
        if let Ok(m) = result {
            let mut ends = self.1.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(end) = usize::try_from(m.partition()).ok().and_then(|p| ends.get_mut(p)) {
                *end = (*end).max(m.offset() + 1);
            }
        }
        if let Err((e, m)) = result {
            tracing::warn!(number = *n, partition = m.partition(), error = %e, "workload: delivery failed; producing it again");
            if let Ok(mut q) = self.0.lock() {
                q.push_back(*n);
            }
        }
    }
}

/// The producer thread.
pub struct Workload {
    /// When the first number was due; number `n` is due `n / rate` seconds later.
    pub started: Instant,
    pub rate: u64,
    /// Per input partition, the offset after the last acknowledged record.
    pub acked_ends: Arc<Mutex<Vec<i64>>>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl Workload {
    pub fn start(bootstrap: &str, topic: &str, rate: u64) -> anyhow::Result<Workload> {
        let acked_ends = Arc::new(Mutex::new(vec![0i64; IN_PARTITIONS as usize]));
        let producer: BaseProducer<Failed> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            // A retry after a broker fault (a leader killed with the batch in flight) writes no
            // second copy: the input holds each number once unless a delivery failed outright.
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("message.timeout.ms", "600000")
            .set("reconnect.backoff.max.ms", "500")
            .set("log_level", "3")
            .create_with_context(Failed(Mutex::new(VecDeque::new()), acked_ends.clone()))
            .context("creating the workload producer")?;
        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_next, t_stop, topic) = (next.clone(), stop.clone(), topic.to_string());
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("chaos-workload".into())
            .spawn(move || -> anyhow::Result<u64> {
                let mut resent = 0u64;
                let mut sent: u64 = 0;
                while !t_stop.load(Ordering::SeqCst) {
                    let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                    // Numbers to produce again first.
                    let again: Vec<u64> =
                        producer.context().0.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
                    for n in again {
                        resent += 1;
                        send(&producer, &topic, n)?;
                    }
                    while sent < due {
                        match send(&producer, &topic, sent) {
                            Ok(true) => {
                                sent += 1;
                                t_next.store(sent, Ordering::SeqCst);
                            }
                            Ok(false) => break, // queue full: later
                            Err(e) => return Err(e),
                        }
                    }
                    producer.poll(Duration::from_millis(10));
                }
                // Until every number is acknowledged: failed ones are produced again.
                let deadline = Instant::now() + Duration::from_secs(180);
                loop {
                    producer.flush(Duration::from_secs(120)).context("flushing the workload")?;
                    producer.poll(Duration::from_millis(100));
                    let again: Vec<u64> =
                        producer.context().0.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
                    if again.is_empty() {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(anyhow!(
                            "{} numbers could not be delivered, first {:?}",
                            again.len(),
                            again.first()
                        ));
                    }
                    for n in again {
                        resent += 1;
                        send(&producer, &topic, n)?;
                    }
                }
                Ok(resent)
            })
            .context("starting the workload thread")?;
        Ok(Workload { started, rate, acked_ends, next, stop, thread: Some(thread) })
    }

    /// When number `n` was due to be produced.
    pub fn due(&self, n: u64) -> Instant {
        self.started + Duration::from_secs_f64(n as f64 / self.rate.max(1) as f64)
    }

    /// The next number to be produced (every number below it was handed to the producer).
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops, waits until every number is acknowledged; returns the end of the range and how
    /// many numbers were produced again after a failed delivery.
    pub fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let resent = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => return Err(anyhow!("the workload thread panicked")),
            None => 0,
        };
        Ok((self.next(), resent))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Hands `n` to the producer: `Ok(false)` when its queue is full.
fn send(producer: &BaseProducer<Failed>, topic: &str, n: u64) -> anyhow::Result<bool> {
    let key = format!("k{:02}", key_of(n));
    let value = value_of(n);
    let partition = i32::try_from(partition_of(n))?;
    let record =
        BaseRecord::with_opaque_to(topic, Box::new(n)).key(&key).payload(&value).partition(partition);
    match producer.send(record) {
        Ok(()) => Ok(true),
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Ok(false),
        Err((e, _)) => Err(anyhow!("producing {n}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_keys_stay_in_one_partition() {
        for n in [0, 1, 11, 12, 12345] {
            assert_eq!(parse_value(value_of(n).as_bytes()), Some((key_of(n), n)));
        }
        assert_eq!(parse_value(b"k03,12"), None, "key does not match the number");
        assert_eq!(parse_value(b"garbage"), None);
        assert!((0..100).all(|n| partition_of(n) == partition_of(n + KEYS)));
    }
}
