//! Task metrics with labels, their Prometheus text exposition, and the HTTP endpoint serving it.
//!
//! Layout:
//! - [`names`]: the metric names Keel reports (Flink's names, from its Kafka connector and
//!   source/sink metric groups), each with its kind and help text.
//! - [`registry`]: the [`Registry`] and the handles it hands out: [`Counter`] (u64),
//!   [`Gauge`] (f64), [`ElapsedGauge`] (milliseconds since a mark), [`Meter`] (a per-second rate
//!   of a counter). Metrics are registered through a [`MetricGroup`] (a set of labels such as
//!   `job`, `task`, `subtask`) and unregistered when the group is dropped.
//! - [`task`]: ready-made bundles for a source ([`SourceMetrics`]), one of its partitions
//!   ([`PartitionMetrics`]) and a sink ([`SinkMetrics`]).
//! - [`prometheus`]: rendering in the Prometheus text format 0.0.4.
//! - [`server`]: [`MetricsServer`], a small HTTP/1.1 server answering `GET /metrics`.
//!
//! # Naming
//!
//! Metrics are registered and looked up by their Flink names (`numRecordsIn`). In Prometheus
//! they are `keel_` + the name in snake_case, and counters get `_total`:
//! `numRecordsIn` → `keel_num_records_in_total`, `numRecordsInPerSecond` →
//! `keel_num_records_in_per_second`, `currentEmitEventTimeLag` →
//! `keel_current_emit_event_time_lag`. Units are Flink's (milliseconds for lags and times), and
//! each metric's help text says so.
//!
//! # Rates
//!
//! A [`Meter`] computes its rate when it is read (by a scrape or [`Registry::get`]), from
//! timestamped samples of its counter: each read records `(now, count)` (at most one sample per
//! second is kept) and the rate is the count difference over the time difference between the
//! newest sample and the oldest one still covering the window (60 s, as Flink's `MeterView`).
//! Nothing ticks in the background; before the window has filled, the rate is the average since
//! the meter was created.

pub mod names;
pub mod prometheus;
pub mod registry;
pub mod server;
pub mod task;

pub use names::Kind;
pub use registry::{Counter, ElapsedGauge, Gauge, Meter, MetricGroup, Registry, Sample};
pub use server::{serve, MetricsServer};
pub use task::{PartitionMetrics, SinkMetrics, SourceMetrics};
