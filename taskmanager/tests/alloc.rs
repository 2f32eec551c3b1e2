//! The chain allocates per batch, not per record.
//!
//! This test binary counts every heap allocation (a counting wrapper around the system
//! allocator) while a real operator chain (the source driver on the async runtime, the sink
//! thread, the bounded channel between them) runs datagen -> filter + projection -> blackhole
//! over 1,000,000 records. It asserts at most [`PER_BATCH`] allocations per batch on average
//! over the whole run: an allocation per record would be at least 1,000,000 and fail. The
//! record counts are checked too (half of the records pass the filter).
#![allow(unsafe_code)] // the counting allocator: GlobalAlloc is an unsafe trait

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_spec::JobSpec;
use keel_taskmanager::task::datagen::MAX_BATCH;
use keel_taskmanager::task::{ChainEnd, ChainIo, ChainPlan, Counters, TaskInfo, TaskMetrics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

const RECORDS: u64 = 1_000_000;
/// The bound asserted: allocations per batch on average over the whole run (the batch's
/// column and its Arrow wrappers, the filter's mask and the filtered copy, the projected
/// batch, channel blocks, the sink thread's waits).
const PER_BATCH: u64 = 64;

/// datagen -> filter (`id >= 500000`, half) + projection (`id as n`) -> blackhole, 1,000,000
/// records at parallelism 1: at most PER_BATCH allocations per batch, and every record counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagen_filter_projection_blackhole_allocates_per_batch() -> Result<(), Box<dyn std::error::Error>> {
    let spec = JobSpec::parse(&format!(
        "name: alloc\nsources:\n  - {{name: n, connector: datagen, number-of-rows: {RECORDS}, rows-per-second: 1000000000}}\nsinks:\n  - {{name: out, connector: blackhole, from: n, filter: \"id >= {}\", select: [id as n]}}\n",
        RECORDS / 2
    ))?;
    let plan = ChainPlan::build(&spec, 0, 1, &[])?;
    let info = TaskInfo {
        task_id: "alloc/1/0#0".into(),
        job_id: "alloc".into(),
        job_name: "alloc".into(),
        version: 1,
        subtask: 0,
        parallelism: 1,
        attempt: 0,
        slot_index: 0,
        allocation_id: "a".into(),
        jobmanager_epoch: 1,
        jobmanager_address: "127.0.0.1:1".into(),
    };
    let metrics = Arc::new(TaskMetrics::detached(&info, &plan));
    let open = plan.open(&metrics).await?;
    let (_control, control_rx) = mpsc::channel(8);
    let (acks, _acks_rx) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let io = ChainIo {
        cancel: CancellationToken::new(),
        control: control_rx,
        acks,
        counters: counters.clone(),
        metrics,
    };
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let end = tokio::time::timeout(Duration::from_secs(600), open.run(io)).await??;
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(end, ChainEnd::Finished);
    assert_eq!(counters.records_in(), RECORDS);
    assert_eq!(counters.records_out(), RECORDS / 2);
    let batches = RECORDS.div_ceil(MAX_BATCH as u64);
    println!(
        "{allocs} allocations for {RECORDS} records in at least {batches} batches ({:.1} per batch, {:.4} per record)",
        allocs as f64 / batches as f64,
        allocs as f64 / RECORDS as f64
    );
    assert!(allocs <= PER_BATCH * batches, "{allocs} allocations for {batches} batches");
    Ok(())
}
