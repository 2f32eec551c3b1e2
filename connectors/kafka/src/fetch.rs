//! Batch consumption for [`crate::source::KafkaSourceReader`].
//!
//! rdkafka 0.39 consumes through librdkafka's event API: every `BaseConsumer::poll` pops one
//! event that holds one message, and takes a clock reading and an `Arc` for it; librdkafka
//! reads the clock again and updates the partition's application position per message. That
//! was about a tenth of a TaskManager's CPU in a Kafka pass-through.
//!
//! Here the partitions a reader is assigned fetch into a queue of the reader's own
//! ([`FetchQueue`]), which the poll loop drains a batch at a time with librdkafka's
//! `rd_kafka_consume_batch_queue` (not wrapped by rdkafka). Everything else the consumer
//! reports (statistics, logs, client errors, commit results) stays on the consumer's own
//! queue and is served by rdkafka's `poll` as before, so the client's callbacks keep working.
//! A partition is routed to the fetch queue *before* it is assigned: librdkafka keeps a queue
//! forwarding the application set when it starts fetching, so no message of it can reach the
//! consumer's queue.
//!
//! Messages are read where librdkafka holds them ([`Fetched::view`]): key, value and headers
//! are borrowed, nothing is copied.
//!
//! Two consequences, read in librdkafka 2.12.1's source:
//! - When a partition's fetching stops (unassign, close), librdkafka drops its forwarding but
//!   keeps the mark that the application set one, so a partition assigned again must be
//!   routed again first. Keel's reader never unassigns (it only adds partitions).
//! - A partition error that librdkafka raises from metadata rather than from a fetch (a desired
//!   partition that is missing, a topic that does not exist or is no longer authorized) is an
//!   error operation on the partition's queue. The batch call serves it by logging it at
//!   error level, naming topic and partition (rdkafka sets no error callback); the event API
//!   returned it as an error instead. Errors of a fetch (offset out of range, a fetch refused
//!   for authorization) still arrive as error messages and fail or warn as before.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;

/// At most this many messages are taken per [`FetchQueue::consume`] call (the vector that
/// receives them keeps room for as many).
const MAX_PER_CALL: usize = 4096;

/// A queue of the consumer's own that the assigned partitions fetch into.
pub(crate) struct FetchQueue<C: ConsumerContext + 'static> {
    queue: NonNull<rdsys::rd_kafka_queue_t>,
    /// The consumer's queue (where statistics, logs and errors arrive), to ask how much waits
    /// there.
    events: NonNull<rdsys::rd_kafka_queue_t>,
    /// One handle per routed partition's queue, kept to undo the forwarding on drop.
    partitions: Vec<NonNull<rdsys::rd_kafka_queue_t>>,
    /// Keeps the client alive for as long as the queues are.
    consumer: Arc<BaseConsumer<C>>,
}

// SAFETY: librdkafka's queue handles may be used from any thread (every queue operation takes
// the queue's lock); the handles are owned by this value alone.
unsafe impl<C: ConsumerContext + 'static> Send for FetchQueue<C> {}

impl<C: ConsumerContext + 'static> FetchQueue<C> {
    /// A fetch queue on `consumer`, which must be a consumer with a `group.id` (Keel's source
    /// always sets one); `None` when librdkafka gives none.
    pub(crate) fn new(consumer: Arc<BaseConsumer<C>>) -> Option<FetchQueue<C>> {
        let rk = consumer_ptr(&consumer);
        // SAFETY: `rk` is a live consumer handle (kept alive by `consumer`).
        let events = NonNull::new(unsafe { rdsys::rd_kafka_queue_get_consumer(rk) })?;
        // SAFETY: as above; the new queue is owned by the returned value.
        let Some(queue) = NonNull::new(unsafe { rdsys::rd_kafka_queue_new(rk) }) else {
            // SAFETY: `events` was returned by librdkafka above and is not used again.
            unsafe { rdsys::rd_kafka_queue_destroy(events.as_ptr()) };
            return None;
        };
        Some(FetchQueue { queue, events, partitions: Vec::new(), consumer })
    }

    /// Routes the messages of `topic` `partition` to this queue. Call it before the partition
    /// is assigned.
    pub(crate) fn route(&mut self, topic: &str, partition: i32) -> Result<(), String> {
        let name = CString::new(topic).map_err(|_| format!("topic name {topic:?} holds a NUL byte"))?;
        // SAFETY: a live consumer handle and a NUL-terminated name; librdkafka creates the
        // partition's state when it does not know it yet.
        let pq = unsafe {
            rdsys::rd_kafka_queue_get_partition(consumer_ptr(&self.consumer), name.as_ptr(), partition)
        };
        let pq = NonNull::new(pq)
            .ok_or_else(|| format!("the Kafka client has no queue for {topic} [{partition}]"))?;
        // SAFETY: both are live queue handles of the same client. Forwarding set by the
        // application is kept when the partition starts fetching.
        unsafe { rdsys::rd_kafka_queue_forward(pq.as_ptr(), self.queue.as_ptr()) };
        self.partitions.push(pq);
        Ok(())
    }

    /// How many operations (statistics, logs, errors) wait on the consumer's queue.
    pub(crate) fn events_waiting(&self) -> usize {
        // SAFETY: a live queue handle owned by this value.
        unsafe { rdsys::rd_kafka_queue_length(self.events.as_ptr()) }
    }

    /// Appends up to `max` messages (at most [`MAX_PER_CALL`]) to `into`, waiting up to
    /// `timeout` for them (`ZERO`: takes what is there). librdkafka waits for all `max` within
    /// the timeout, so ask for one message when waiting and for the rest without. Returns how
    /// many were appended.
    pub(crate) fn consume(
        &self,
        into: &mut Fetched,
        max: usize,
        timeout: Duration,
    ) -> Result<usize, KafkaError> {
        let max = max.min(MAX_PER_CALL);
        into.messages.reserve(max);
        let spare = into.messages.spare_capacity_mut();
        let max = max.min(spare.len());
        if max == 0 {
            return Ok(0);
        }
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `spare` has room for `max` pointers, which librdkafka fills from the front;
        // the queue handle is live.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                spare.as_mut_ptr().cast::<*mut rdsys::rd_kafka_message_t>(),
                max,
            )
        };
        let n = usize::try_from(n).map_err(|_| {
            // SAFETY: reads this thread's last librdkafka error.
            KafkaError::MessageConsumption(unsafe { rdsys::rd_kafka_last_error() }.into())
        })?;
        let len = into.messages.len();
        // SAFETY: librdkafka wrote `n <= max` valid message pointers after `len`.
        unsafe { into.messages.set_len(len + n.min(max)) };
        Ok(n.min(max))
    }
}

impl<C: ConsumerContext + 'static> Drop for FetchQueue<C> {
    fn drop(&mut self) {
        // SAFETY: every handle was returned by librdkafka, is owned here and used no more.
        unsafe {
            for pq in self.partitions.drain(..) {
                rdsys::rd_kafka_queue_forward(pq.as_ptr(), ptr::null_mut());
                rdsys::rd_kafka_queue_destroy(pq.as_ptr());
            }
            rdsys::rd_kafka_queue_destroy(self.queue.as_ptr());
            rdsys::rd_kafka_queue_destroy(self.events.as_ptr());
        }
    }
}

fn consumer_ptr<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> *mut rdsys::rd_kafka_t {
    use rdkafka::consumer::Consumer;
    consumer.client().native_ptr()
}

/// Messages taken from a [`FetchQueue`], in the order fetched, and how many of them were
/// handed out. They are librdkafka's until [`Fetched::clear`] (or drop) destroys them; the
/// vector is reused from batch to batch.
#[derive(Default)]
pub(crate) struct Fetched {
    messages: Vec<*mut rdsys::rd_kafka_message_t>,
    /// The first message not handed out yet (a `Cell`: it moves while messages are borrowed).
    next: Cell<usize>,
}

// SAFETY: a consumed message may be read and destroyed on any thread; the pointers are owned
// by this value alone.
unsafe impl Send for Fetched {}

impl Fetched {
    pub(crate) fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether every message was handed out (or there are none).
    pub(crate) fn is_done(&self) -> bool {
        self.next.get() >= self.messages.len()
    }

    /// The index of the first message not handed out yet.
    pub(crate) fn next(&self) -> usize {
        self.next.get()
    }

    /// Marks the next message handed out.
    pub(crate) fn advance(&self) {
        self.next.set(self.next.get() + 1);
    }

    /// Destroys every message and starts over.
    pub(crate) fn clear(&mut self) {
        for m in self.messages.drain(..) {
            // SAFETY: each pointer came from `rd_kafka_consume_batch_queue` and is destroyed
            // once, here.
            unsafe { rdsys::rd_kafka_message_destroy(m) };
        }
        self.next.set(0);
    }

    /// Message `i`, read in place.
    pub(crate) fn view(&self, i: usize) -> RawMessage<'_> {
        // SAFETY: a message returned by librdkafka and not destroyed yet (only `clear` does,
        // which needs `&mut self`).
        RawMessage { m: unsafe { &*self.messages[i] } }
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A consumed message, borrowed from librdkafka.
#[derive(Clone, Copy)]
pub(crate) struct RawMessage<'a> {
    m: &'a rdsys::rd_kafka_message_t,
}

impl<'a> RawMessage<'a> {
    /// The consumer error this message stands for, if it is one.
    pub(crate) fn error(&self) -> Option<KafkaError> {
        let err: RDKafkaRespErr = self.m.err;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR => None,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                Some(KafkaError::PartitionEOF(self.m.partition))
            }
            e => Some(KafkaError::MessageConsumption(e.into())),
        }
    }

    /// Identifies the message's topic within one client (cheaper to compare than its name).
    pub(crate) fn topic_handle(&self) -> *const c_void {
        self.m.rkt.cast_const().cast()
    }

    /// The topic's name; `None` if it is not UTF-8 (Kafka allows only ASCII).
    pub(crate) fn topic(&self) -> Option<&'a str> {
        // SAFETY: a message's topic handle lives as long as the message; librdkafka returns a
        // NUL-terminated name.
        unsafe { CStr::from_ptr(rdsys::rd_kafka_topic_name(self.m.rkt)) }.to_str().ok()
    }

    pub(crate) fn partition(&self) -> i32 {
        self.m.partition
    }

    pub(crate) fn offset(&self) -> i64 {
        self.m.offset
    }

    pub(crate) fn key(&self) -> Option<&'a [u8]> {
        bytes(self.m.key, self.m.key_len)
    }

    pub(crate) fn value(&self) -> Option<&'a [u8]> {
        bytes(self.m.payload, self.m.len)
    }

    /// The timestamp in ms and whether it is a create time (`true`) or a log-append time.
    pub(crate) fn timestamp(&self) -> Option<(i64, bool)> {
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message; librdkafka writes the type.
        let ms = unsafe { rdsys::rd_kafka_message_timestamp(self.m, &mut kind) };
        match kind {
            rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => Some((ms, true)),
            rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => Some((ms, false)),
            _ => None,
        }
    }

    /// The partition leader's epoch when the record was written, if known.
    pub(crate) fn leader_epoch(&self) -> Option<i32> {
        // SAFETY: a live message that is not an error, which is what librdkafka requires.
        let epoch = unsafe { rdsys::rd_kafka_message_leader_epoch(self.m) };
        (epoch >= 0).then_some(epoch)
    }

    /// The message's headers, if it has any.
    pub(crate) fn headers(&self) -> Option<RawHeaders<'a>> {
        let mut h: *mut rdsys::rd_kafka_headers_t = ptr::null_mut();
        // SAFETY: a live message; librdkafka parses its headers on first use and keeps them
        // with the message.
        let err = unsafe { rdsys::rd_kafka_message_headers(self.m, &mut h) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        NonNull::new(h).map(|h| RawHeaders { h, _message: PhantomData })
    }
}

fn bytes<'a>(p: *mut c_void, len: usize) -> Option<&'a [u8]> {
    if p.is_null() {
        None
    } else {
        // SAFETY: librdkafka's `len` bytes at `p`, which live as long as the message.
        Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
    }
}

/// A consumed message's headers, borrowed from librdkafka.
#[derive(Clone, Copy)]
pub(crate) struct RawHeaders<'a> {
    h: NonNull<rdsys::rd_kafka_headers_t>,
    _message: PhantomData<&'a rdsys::rd_kafka_message_t>,
}

impl<'a> RawHeaders<'a> {
    pub(crate) fn count(&self) -> usize {
        // SAFETY: live headers of a live message.
        unsafe { rdsys::rd_kafka_header_cnt(self.h.as_ptr()) }
    }

    /// Header `i` as (name, value). A name that is not UTF-8 (Kafka's clients write UTF-8,
    /// but the protocol carries bytes) reads as U+FFFD rather than failing the record.
    pub(crate) fn get(&self, i: usize) -> Option<(&'a str, Option<&'a [u8]>)> {
        let mut name: *const c_char = ptr::null();
        let mut value: *const c_void = ptr::null();
        let mut size = 0usize;
        // SAFETY: live headers; librdkafka writes the three out-parameters.
        let err =
            unsafe { rdsys::rd_kafka_header_get_all(self.h.as_ptr(), i, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: a NUL-terminated name that lives as long as the headers.
        let name = unsafe { CStr::from_ptr(name) }.to_str().unwrap_or("\u{fffd}");
        Some((name, bytes(value.cast_mut(), size)))
    }
}
