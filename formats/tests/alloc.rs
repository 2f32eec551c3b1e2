//! The codecs allocate per batch, not per record.
//!
//! This test binary counts every heap allocation (a counting wrapper around the system
//! allocator). It decodes 1,000,000 CSV and 1,000,000 JSON messages (BIGINT, STRING, INT, DATE
//! and DECIMAL columns, and in JSON a nested ROW column) into batches of 1,024 rows and encodes
//! every batch back, and asserts that the steady state costs at most
//! [`PER_BATCH`] allocations per batch: a codec that allocated once per record would cost at
//! least 1,024 per batch and fail. The decoded rows are checked too, so the loop cannot pass by
//! doing nothing.
#![allow(unsafe_code)] // the counting allocator: GlobalAlloc is an unsafe trait

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Decimal128Type, Int32Type, Int64Type};
use arrow_array::Array;
use keel_formats::{
    BatchBuilder, ColumnDef, DataType, EncodedBatch, KafkaMessage, RecordDecoder, RecordEncoder,
    RecordFormat, Schema,
};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RECORDS: usize = 1_000_000;
const BATCH: usize = 1024;
/// The bound asserted: allocations per batch of 1,024 rows, decoding and encoding together
/// (Arrow's buffers of a new batch, the builders' restart, the encoder's column views).
const PER_BATCH: u64 = 64;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// The columns of `format`'s messages: json adds a ROW (csv refuses them).
fn schema(format: &str) -> Result<Schema, Box<dyn std::error::Error>> {
    let mut columns = vec![
        ColumnDef::new("id", DataType::BigInt),
        ColumnDef::new("name", DataType::String),
        ColumnDef::new("age", DataType::Int),
        ColumnDef::new("day", DataType::Date),
        ColumnDef::new("amount", DataType::Decimal { precision: 12, scale: 2 }),
    ];
    if format == "json" {
        columns.push(ColumnDef::new(
            "props",
            "ROW<owner STRING, n INT, deep ROW<tag STRING>>".parse::<DataType>()?,
        ));
    }
    Ok(Schema::from_columns("columns", &columns)?)
}

/// All payloads in one buffer (built before counting), with their ranges.
fn payloads(format: &str) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
    let mut buf = Vec::with_capacity(RECORDS * 80);
    let mut ranges = Vec::with_capacity(RECORDS);
    for id in 0..RECORDS {
        let start = buf.len();
        // 2024-05-01 plus up to 27 days; id.cc with cc = id % 100.
        let (age, day, cents) = (id % 100, id % 28 + 1, id % 100);
        let line = if format == "csv" {
            format!("{id},name-{id},{age},2024-05-{day:02},{id}.{cents:02}")
        } else {
            format!(
                "{{\"id\":{id},\"name\":\"name-{id}\",\"age\":{age},\"day\":\"2024-05-{day:02}\",\"amount\":{id}.{cents:02},\
                 \"props\":{{\"owner\":\"o-{id}\",\"n\":{age},\"deep\":{{\"tag\":\"t\"}}}}}}"
            )
        };
        buf.extend_from_slice(line.as_bytes());
        ranges.push(start..buf.len());
    }
    (buf, ranges)
}

/// Decodes and re-encodes every payload; returns (allocations counted, batches, rows checked).
fn run(format: &str) -> Result<(u64, u64, u64), Box<dyn std::error::Error>> {
    let schema = schema(format)?;
    let options: BTreeMap<String, String> = [("format".to_string(), format.to_string())].into();
    let record_format = RecordFormat::from_options("sources[0]", &options, &schema)?;
    let mut decoder = RecordDecoder::new(&schema, &record_format);
    let encoder = RecordEncoder::new(&schema, &record_format);
    let mut builder: BatchBuilder = decoder.builder(BATCH);
    let mut encoded = EncodedBatch::new();
    let (buf, ranges) = payloads(format);
    let (mut batches, mut checked, mut bytes_out) = (0u64, 0u64, 0usize);
    // Warm-up batch: the first one sizes the reused buffers.
    let mut counted_from = None;
    for (offset, range) in ranges.iter().enumerate() {
        let msg = KafkaMessage {
            topic: "in",
            partition: 0,
            offset: offset as i64,
            timestamp: None,
            timestamp_type: keel_formats::TimestampType::NoTimestampType,
            leader_epoch: None,
            headers: &[],
            key: None,
            value: buf.get(range.clone()),
        };
        if !decoder.decode_into(&msg, &mut builder)? {
            return Err(format!("message {offset} was skipped").into());
        }
        if builder.len() == BATCH || offset + 1 == RECORDS {
            let batch = builder.finish();
            encoder.encode_batch(&batch, &mut encoded)?;
            // Spot checks that the batch holds the decoded values and the encoding its text.
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let ages = batch.column(2).as_primitive::<Int32Type>();
            let days = batch.column(3).as_primitive::<Date32Type>();
            let amounts = batch.column(4).as_primitive::<Decimal128Type>();
            let first = offset + 1 - batch.num_rows();
            // 2024-05-01 is day 19,844 since 1970-01-01.
            if ids.value(0) != first as i64
                || i64::from(ages.value(0)) != (first % 100) as i64
                || i64::from(days.value(0)) != 19_844 + (first % 28) as i64
                || amounts.value(0) != (first as i128) * 100 + (first % 100) as i128
            {
                return Err(format!("batch at {first} decoded wrong").into());
            }
            if format == "json" {
                let props = batch.column(5).as_struct();
                let owner = props.column(0).as_string::<i32>();
                let deep = props.column(2).as_struct().column(0).as_string::<i32>();
                if owner.value(0).strip_prefix("o-").and_then(|n| n.parse::<usize>().ok()) != Some(first)
                    || deep.value(0) != "t"
                    || props.null_count() != 0
                {
                    return Err(format!("batch at {first} decoded its ROW wrong").into());
                }
            }
            if encoded.value(0) != buf.get(ranges[first].clone()) {
                return Err(format!("row {first} re-encoded differently").into());
            }
            checked += batch.num_rows() as u64;
            bytes_out += encoded.payload_len();
            batches += 1;
            if counted_from.is_none() {
                counted_from = Some((allocations(), batches));
            }
        }
    }
    let (start, warm) = counted_from.ok_or("no batch")?;
    if bytes_out != buf.len() {
        return Err(format!("{bytes_out} bytes encoded for {} read", buf.len()).into());
    }
    Ok((allocations() - start, batches - warm, checked))
}

/// CSV and JSON: 1,000,000 messages each, decoded into batches and encoded back, allocate per
/// batch, not per record (at most PER_BATCH allocations per batch of 1,024 rows). One test, so
/// that nothing else runs in this process while it counts.
#[test]
fn codecs_allocate_per_batch_not_per_record() -> Result<(), Box<dyn std::error::Error>> {
    for format in ["csv", "json"] {
        let (allocs, batches, rows) = run(format)?;
        assert_eq!(rows, RECORDS as u64);
        println!(
            "{format}: {allocs} allocations for {batches} batches ({:.2} per batch)",
            allocs as f64 / batches as f64
        );
        assert!(allocs <= PER_BATCH * batches, "{format}: {allocs} allocations for {batches} batches");
    }
    Ok(())
}
